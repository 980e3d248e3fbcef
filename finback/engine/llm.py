"""The offline Python API, in vLLM's shape:

    from finback import LLM, SamplingParams
    llm = LLM("model.gguf", max_model_len=4096)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

from finback.engine.arg_utils import EngineArgs
from finback.engine.llm_engine import LLMEngine
from finback.engine.request import RequestOutput
from finback.engine.sampling import SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str, **engine_args):
        from finback.store.resolve import resolve_model_path

        self.engine = LLMEngine(EngineArgs.from_kwargs(resolve_model_path(model), **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
            return prompt, tok.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
        raise TypeError("a prompt is a string or a dict with 'prompt' or 'prompt_token_ids'")

    def generate(self, prompts: PromptType | Iterable[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        order = []
        added = []
        try:
            for prompt, p in zip(prompts, params):
                text, ids = self._prompt_ids(prompt)
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, ids, p, prompt=text)
                added.append(rid)
                order.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return self._run(order)

    def _run(self, order: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(order):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
            if not self.engine.has_unfinished_requests() and len(done) < len(order):
                raise RuntimeError("engine stopped with requests unfinished")
        return [done[r] for r in order]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs) -> list[RequestOutput]:
        from finback.prompt.template import ChatTemplate

        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        source = chat_template or tok.chat_template
        if not source:
            raise ValueError("the model has no chat template; pass chat_template=")
        template = ChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)
        prompts = []
        for conv in convs:
            text = template.render(conv, add_generation_prompt=add_generation_prompt, **template_kwargs)
            # templates write the BOS themselves; the text is tokenized without adding another
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)
