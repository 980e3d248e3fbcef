"""finback.prompt.gotemplate renders Go text/template as Go (and Ollama) render it.

Every expected output below is written from Go's rules (text/template, fmt, encoding/json) and
Ollama's template/template.go; where the rule is subtle the comment beside the case says which.
"""

from __future__ import annotations

import datetime

import pytest

from finback.prompt.gotemplate import (
    GoStruct,
    GoTemplate,
    GoTemplateError,
    go_json,
    go_sprintf,
    ollama_chat_messages,
    render_ollama,
    render_ollama_chat,
    render_ollama_generate,
)

DATA = {
    "Name": "R1",
    "Empty": "",
    "Zero": 0,
    "L": ["a", "b", "c"],
    "LL": [[1, 2], [3, 4]],
    "M": {"b": 2, "a": 1, "c": 3},
    "F": 2.5,
    "T": True,
    "Nil": None,
    "S": GoStruct("main.S", {"A": 1, "B": "x"}),
}


def render(src: str, data=None, **kw) -> str:
    return GoTemplate(src, **kw).render(DATA if data is None else data)


# ------------------------------------------------------------------------------------------------
# Rendering: (template, expected) against DATA
# ------------------------------------------------------------------------------------------------

CASES = [
    # fields and printing
    ("{{ .Name }}", "R1"),
    ("{{ .S.B }}{{ .S.A }}", "x1"),
    # a missing map key prints <no value> (with missingkey=zero the nil interface{} is unwrapped to
    # the invalid value, which printValue writes as <no value>)
    ("{{ .Missing }}", "<no value>"),
    # a nil inside data is a nil interface: same <no value> at top level ...
    ("{{ .Nil }}", "<no value>"),
    # ... but fmt prints a nil element of a slice as <nil>
    ("{{ .X }}", "[1 <nil> true]"),
    # slices print as [a b], maps as map[k:v] with sorted keys, structs as {v1 v2}
    ("{{ .L }} {{ .M }} {{ .S }}", "[a b c] map[a:1 b:2 c:3] {1 x}"),
    # %v of a float64 is %g with the shortest digits: exponent form from 1e+06 and below 1e-04
    ("{{ .F }} {{ 3.0 }} {{ 1e6 }} {{ 100000.0 }} {{ 0.0001 }} {{ 0.00001 }} {{ 12345678.0 }}",
     "2.5 3 1e+06 100000 0.0001 1e-05 1.2345678e+07"),
    ("{{ true }} {{ false }} {{ .T }}", "true false true"),
    # number literals: hex, underscores, octal, exponent (a float), sign; char constants are ints
    ("{{ 0x1F }} {{ 1_000 }} {{ 017 }} {{ 1e3 }} {{ -7 }} {{ 'a' }} {{ 2.50 }}",
     "31 1000 15 1000 -7 97 2.5"),
    # Go string escapes (\x and octal are bytes), raw strings keep backslashes
    (r'{{ "t\tq\"\u00e9\x41\101" }}|{{ `a\nb` }}', 't\tq"éAA|a\\nb'),
    ("{{ $ }}", None),  # filled below: $ is the data itself

    # trim markers: "{{- " and " -}}" remove all adjacent spaces, tabs and newlines
    ("a  \n\t {{- .Name -}} \n\n  b", "aR1b"),
    # without the space it is not a trim marker but a negative number
    ("a {{-3}} b", "a -3 b"),
    ("x {{ 1 }}  {{- 2 }} \n{{- 3 -}}\n y", "x 123y"),
    # comments, also with trim markers
    ("a {{/* note */}} b|a {{- /* note */ -}} b", "a  b|ab"),

    # if / else if / else; truth: false, 0, "", empty list/map and nil are false
    ('{{ if .Empty }}1{{ else if .Zero }}2{{ else if .L }}3{{ else }}4{{ end }}', "3"),
    ("{{ if .Missing }}y{{ else }}n{{ end }}{{ if .Nil }}y{{ else }}n{{ end }}"
     "{{ if .S }}y{{ end }}{{ if 0.0 }}y{{ else }}n{{ end }}", "nnyn"),
    # with sets dot; else with chains like else if; the else branch keeps the old dot
    ("{{ with .Missing }}{{ . }}{{ else with .M.b }}b={{ . }}{{ else }}none{{ end }}", "b=2"),
    ("{{ with .Empty }}x{{ else }}{{ .Name }}{{ end }}", "R1"),

    # range: dot is the element; $i, $e get index and element
    ("{{ range .L }}[{{ . }}]{{ end }}", "[a][b][c]"),
    ("{{ range $i, $e := .L }}{{ if $i }},{{ end }}{{ $i }}:{{ $e }}{{ end }}", "0:a,1:b,2:c"),
    # a map ranges in sorted key order, the key going to the first variable
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", "a=1;b=2;c=3;"),
    # else runs for an empty or nil collection (a string cannot be ranged: see the errors)
    ("{{ range .Missing }}x{{ else }}none{{ end }}{{ range .Nil }}{{ else }}!{{ end }}"
     "{{ range .LL }}{{ range slice . 0 0 }}{{ else }}-{{ end }}{{ end }}", "none!--"),
    # ranging an int counts from 0 (Go 1.24)
    ("{{ range 3 }}{{ . }}{{ end }}", "012"),
    # break and continue
    ("{{ range .LL }}{{ range . }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}"
     "{{ break }}{{ end }}{{ . }}{{ end }}{{ end }}", "13"),

    # variables: := declares (shadowing inside a control until its end), = assigns
    ("{{ $x := 1 }}{{ if true }}{{ $x := 2 }}{{ $x }}{{ end }}{{ $x }}", "21"),
    ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", "2"),
    ("{{ $n := len .L }}{{ range .L }}{{ $n }}{{ end }}", "333"),
    ("{{ range .L }}{{ $.Name }}{{ end }}", "R1R1R1"),

    # define / template / block; a template call gets the pipeline as dot and $
    ('{{ define "item" }}<{{ . }}>{{ end }}{{ range .L }}{{ template "item" . }}{{ end }}',
     "<a><b><c>"),
    ('{{ block "greet" .Name }}hi {{ . }}{{ end }}!', "hi R1!"),
    ('{{ define "t" }}{{ $ }}{{ end }}{{ template "t" }}', "<no value>"),

    # and/or short-circuit and return the deciding argument, not a bool
    ('{{ and 1 "" 3 }}|{{ and "a" "b" }}|{{ or 0 "" "x" }}|{{ or 0 false }}', "|b|x|false"),
    # short-circuit: the failing index is never evaluated
    ("{{ or 1 (index .L 99) }}{{ and 0 (index .L 99) }}", "10"),
    ("{{ not 0 }} {{ not .L }} {{ not .Missing }}", "true false true"),
    # eq with several arguments is a==b || a==c ...
    ('{{ eq "c" "a" "b" "c" }} {{ eq 1 2 }} {{ ne "a" "b" }}', "true false true"),
    # comparing a nil (missing) value with a string is false, not an error
    ('{{ eq .Missing "x" }}', "false"),
    ('{{ lt 1 2 }} {{ le 2.5 2.5 }} {{ gt "b" "a" }} {{ ge 1 2 }}', "true true true false"),

    # len counts the UTF-8 bytes of a string
    ('{{ len "héllo" }} {{ len .L }} {{ len .M }}', "6 3 3"),
    # index takes several indexes; a missing map key is a nil (printed <no value>)
    ('{{ index .LL 1 0 }} {{ index .M "b" }} {{ index .M "zz" }}', "3 2 <no value>"),
    # index of a string is its byte (a number)
    ('{{ index "abc" 1 }}', "98"),
    ('{{ slice .L 1 }} {{ slice .L 0 2 }} {{ slice "hello" 1 3 }}', "[b c] [a b] el"),

    # print adds spaces only between operands when neither is a string
    ('{{ print "a" 1 2 "b" .T }}', "a1 2btrue"),
    ('{{ println "a" 1 }}', "a 1\n"),
    # the value of a pipeline stage becomes the last argument of the next
    ('{{ "b" | printf "%s-%s" "a" }}', "a-b"),
    ("{{ .L | len | printf \"%03d\" }}", "003"),
    ('{{ (index .LL 0) }} {{ (index .LL 1).Missing }}', None),  # filled below

    # printf follows fmt.Sprintf
    ('{{ printf "%s|%d|%v|%t|%.2f|%5s|%-5s|%05d|%x|%X|%+d" "s" 42 .L true 3.14159 "r" "l" 42 '
     '"hi" 255 5 }}', "s|42|[a b c]|true|3.14|    r|l    |00042|6869|FF|+5"),
    # %q is strconv.Quote (printable Unicode kept, \n escaped); on an int it quotes the rune
    ('{{ printf "%q %q" "é\\"\\n" 65 }}', "\"é\\\"\\n\" 'A'"),
    ('{{ printf "%e %g %v" 123456.789 0.00001234 1e21 }}', "1.234568e+05 1.234e-05 1e+21"),
    # wrong verbs and argument counts are reported inline, not raised
    ('{{ printf "%d|%s %s" "x" "a" }}', "%!d(string=x)|a %!s(MISSING)"),
    ('{{ printf "%d" 1 2 }}', "1%!(EXTRA int=2)"),
    ('{{ printf "%[2]s%[1]s" "a" "b" }}', "ba"),

    # escapers
    ('{{ html "<a href=\\"x\\">&\'" }}', "&lt;a href=&#34;x&#34;&gt;&amp;&#39;"),
    # html formats its arguments like print, but a nil as <no value>
    ("{{ html .Missing }}", "&lt;no value&gt;"),
    ("{{ js \"it's <b>\" }}", "it\\'s \\u003Cb\\u003E"),
    ('{{ urlquery "a b&c=d/é" }}', "a+b%26c%3Dd%2F%C3%A9"),

    # Ollama's json is encoding/json.Marshal: sorted keys, <>& escaped, 2.0 as 2, nil as null
    ("{{ json .J }}", '{"a":"x\\u003cy \\u0026 é","b":[1,2,null,true],"c":{}}'),
    ("{{ json .Missing }} {{ json 1e21 }} {{ json 0.0000001 }}", "null 1e+21 1e-7"),
]

CASES[CASES.index(("{{ $ }}", None))] = ("{{ $.M }}", "map[a:1 b:2 c:3]")
CASES[CASES.index(('{{ (index .LL 0) }} {{ (index .LL 1).Missing }}', None))] = (
    # a parenthesized pipeline can be followed by fields (a chain node)
    '{{ (index .LL 0) }} {{ (index .M "zz") }} {{ (.S).B }}', "[1 2] <no value> x")


@pytest.mark.parametrize("src,expected", CASES)
def test_render(src, expected):
    data = dict(DATA, X=[1, None, True],
                J={"b": [1, 2.0, None, True], "a": "x<y & é", "c": {}})
    assert GoTemplate(src).render(data) == expected


def test_missingkey_modes():
    # Ollama parses with missingkey=zero: a field of a missing key is a field of a nil interface,
    # an error; Go's default option gives <no value> instead; "error" refuses the missing key.
    with pytest.raises(GoTemplateError, match=r"nil pointer evaluating interface \{\}\.Field"):
        GoTemplate("{{ .Missing.Field }}").render({})
    assert GoTemplate("{{ .Missing.Field }}", missingkey="default").render({}) == "<no value>"
    with pytest.raises(GoTemplateError, match='map has no entry for key "Missing"'):
        GoTemplate("{{ .Missing }}", missingkey="error").render({})


def test_current_date():
    before = datetime.date.today()
    out = GoTemplate("{{ currentDate }}|{{ yesterdayDate }}").render({})
    after = datetime.date.today()
    today, yesterday = out.split("|")
    assert today in (before.isoformat(), after.isoformat())
    assert datetime.date.fromisoformat(today) - datetime.date.fromisoformat(yesterday) == \
        datetime.timedelta(days=1)


def test_go_helpers():
    assert go_sprintf("%6.2f|%-4d|%x", 3.14159, 7, "A") == "  3.14|7   |41"
    assert go_json({"z": [0.5, -0.0], "a": "\u2028"}) == '{"a":"\\u2028","z":[0.5,-0]}'
    with pytest.raises(ValueError):
        go_json(float("nan"))


def test_parse_once_render_many():
    t = GoTemplate("{{ .A }}")
    assert [t.render({"A": i}) for i in range(3)] == ["0", "1", "2"]
    assert GoTemplate('{{ define "x" }}{{ end }}y').templates == ["", "x"]


# ------------------------------------------------------------------------------------------------
# Errors: a GoTemplateError (a ValueError) with Go's message and the position
# ------------------------------------------------------------------------------------------------

PARSE_ERRORS = [
    ("{{ .X ", "unclosed action"),
    ("{{ if .X }}a", "unexpected EOF"),
    ("{{ end }}", "unexpected {{end}}"),
    ("{{ else }}", "unexpected {{else}}"),
    ("{{ foo .X }}", 'function "foo" not defined'),
    ("{{ $y }}", 'undefined variable "$y"'),
    # a define body has its own variable scope
    ('{{ $x := 1 }}{{ define "t" }}{{ $x }}{{ end }}', 'undefined variable "$x"'),
    # variables declared inside a control end at its {{end}}
    ("{{ if true }}{{ $v := 1 }}{{ end }}{{ $v }}", 'undefined variable "$v"'),
    ("{{ break }}", "{{break}} outside {{range}}"),
    ("{{ range .L }}{{ else }}{{ continue }}{{ end }}", "{{continue}} outside {{range}}"),
    ("{{ if }}{{ end }}", "missing value for if"),
    ("{{ 1 | 2 }}", "non executable command in pipeline stage 2"),
    ('{{ "abc }}', "unterminated quoted string"),
    ("{{ /* c */ }}", 'unexpected "/" in command'),  # a comment must touch the delimiter
    ("{{/* c */ }}", "comment ends before closing delimiter"),
    ("{{ .X-}}", "bad character U+002D '-'"),  # the trim marker needs its space
    ("{{ (1 }}", "unclosed left paren"),
    ('{{ define "a" }}x{{ end }}{{ define "a" }}y{{ end }}', 'multiple definition of template "a"'),
    ("{{ range .L }}{{ else if .X }}{{ end }}", "unexpected <if> in input"),
]


@pytest.mark.parametrize("src,message", PARSE_ERRORS)
def test_parse_errors(src, message):
    with pytest.raises(GoTemplateError) as info:
        GoTemplate(src)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.line == 1 and info.value.col >= 1


EXEC_ERRORS = [
    ("{{ .Name.First }}", "can't evaluate field First in type string"),
    # no method calls on data: a Python attribute is not a field
    ("{{ .Name.upper }}", "can't evaluate field upper in type string"),
    ("{{ .S.C }}", "can't evaluate field C in type main.S"),
    ('{{ template "nope" . }}', 'template "nope" not defined'),
    ("{{ index .L 10 }}", "error calling index: index out of range: 10"),
    ("{{ not 1 2 }}", "wrong number of args for not: want 1 got 2"),
    ("{{ len 3 }}", "error calling len: len of type int"),
    ('{{ eq 1 "1" }}', "error calling eq: incompatible types for comparison"),
    ("{{ lt .L 1 }}", "error calling lt: invalid type for comparison"),
    ("{{ range .Name }}{{ end }}", "range can't iterate over R1"),
    ("{{ printf 1 }}", "expected string; found 1"),
    ("{{ .Name 1 }}", "Name is not a method but has arguments"),
    ("{{ nil }}", "nil is not a command"),
    ("{{ range $i, $e := 3 }}{{ end }}", "can't use 3 to iterate over more than one variable"),
]


@pytest.mark.parametrize("src,message", EXEC_ERRORS)
def test_exec_errors(src, message):
    t = GoTemplate(src)
    with pytest.raises(GoTemplateError) as info:
        t.render(DATA)
    assert message in str(info.value)
    assert 'executing ""' in str(info.value)


def test_error_positions():
    with pytest.raises(GoTemplateError) as info:
        GoTemplate("{{ .A }}\nok\n  {{ foo }}")
    assert (info.value.line, info.value.col) == (3, 6)
    assert str(info.value).startswith("template: :3:6: ")
    with pytest.raises(GoTemplateError) as info:
        GoTemplate("x\n  {{ index .L 5 }}").render({"L": [1]})
    assert (info.value.line, info.value.col) == (2, 6)
    assert "at <index .L 5>" in str(info.value)


def test_unsupported_data_is_an_error():
    class Secret:
        def __str__(self):  # pragma: no cover - must never run
            raise AssertionError("template reached Python code")

    with pytest.raises(GoTemplateError, match="unsupported value of Python type Secret"):
        GoTemplate("{{ .x }}").render({"x": Secret()})
    with pytest.raises(GoTemplateError, match="unsupported value"):
        GoTemplate("{{ .x.__class__ }}").render({"x": Secret()})


# ------------------------------------------------------------------------------------------------
# Ollama: the templates people use, rendered as Ollama renders them
# ------------------------------------------------------------------------------------------------

# The deepseek-r1 library template (one line)
R1_TEMPLATE = (
    '{{- if .System }}{{ .System }}{{ end }}{{- range $i, $_ := .Messages }}'
    '{{- $last := eq (len (slice $.Messages $i)) 1}}{{- if eq .Role "user" }}<｜User｜>{{ .Content }}'
    '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}{{- if not $last }}'
    '<｜end▁of▁sentence｜>{{- end }}{{- end }}{{- if and $last (ne .Role "assistant") }}'
    '<｜Assistant｜>{{- end }}{{- end }}')

# The same, as people write it over several lines in a Modelfile: each line break is eaten by "{{-"
R1_TEMPLATE_MULTILINE = """{{- if .System }}{{ .System }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1}}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}{{- if not $last }}<｜end▁of▁sentence｜>{{- end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<｜Assistant｜>{{- end }}
{{- end }}"""

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "And 2+2?"},
]


@pytest.mark.parametrize("src", [R1_TEMPLATE, R1_TEMPLATE_MULTILINE])
def test_deepseek_r1_chat(src):
    t = GoTemplate(src)
    # .System is the joined system messages; the system message stays in .Messages but the
    # template prints only user and assistant turns; the last user turn opens the assistant's
    assert render_ollama_chat(t, CONVERSATION) == (
        "You are helpful.<｜User｜>What is 1+1?<｜Assistant｜>2<｜end▁of▁sentence｜>"
        "<｜User｜>And 2+2?<｜Assistant｜>")
    # a final assistant message is continued: no end-of-sentence, no new assistant tag
    assert render_ollama_chat(t, [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "<think>"}]) == \
        "<｜User｜>Hi<｜Assistant｜><think>"


def test_deepseek_r1_generate_and_collate():
    t = GoTemplate(R1_TEMPLATE)
    # /api/generate: [system] + user prompt through the chat path
    assert render_ollama_generate(t, "Why is the sky blue?", system="Be brief.") == \
        "Be brief.<｜User｜>Why is the sky blue?<｜Assistant｜>"
    # consecutive messages of one role merge with a blank line
    assert render_ollama_chat(t, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) \
        == "<｜User｜>a\n\nb<｜Assistant｜>"
    # several system messages are joined into .System
    assert render_ollama_chat(GoTemplate("{{ .System }}|{{ len .Messages }}"), [
        {"role": "system", "content": "s1"}, {"role": "user", "content": "u"},
        {"role": "system", "content": "s2"}]) == "s1\n\ns2|3"


def test_chatml():
    t = GoTemplate("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")
    assert render_ollama_chat(t, CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3():
    t = GoTemplate("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                   "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_ollama_chat(t, [{"role": "user", "content": "Hi"}]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


LEGACY_LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>")


def test_legacy_template_per_turn():
    t = GoTemplate(LEGACY_LLAMA3)
    assert "messages" not in t.identifiers()
    # one execution per finished turn (system, user, assistant), then the open turn with the
    # template cut right after {{ .Response }} (its <|eot_id|> is gone)
    assert render_ollama_chat(t, CONVERSATION) == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_legacy_template_cut_and_response_append():
    t = GoTemplate("{{ .Prompt }} => {{ .Response }} <end>\n")
    assert render_ollama_chat(t, [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}]) == "a => b <end>\nc => "
    # a last assistant message is continued
    assert render_ollama_chat(t, [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"}]) == "a => b"
    # a template with neither .Messages nor .Response gets {{ .Response }} appended
    legacy = GoTemplate("{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}")
    assert render_ollama(legacy, system="S", prompt="P", response="R") == "S PR"
    assert render_ollama(legacy, prompt="P") == "P"


def test_render_ollama_data():
    t = GoTemplate("{{ .System }}|{{ .Prompt }}|{{ len .Messages }}|{{ range .Messages }}"
                   "{{ .Role }}:{{ .Content }}:{{ .Thinking }};{{ end }}|{{ .Think }}"
                   "|{{ .IsThinkSet }}|{{ .Response }}")
    out = render_ollama(t, system="sys", prompt="p", messages=[
        {"role": "USER", "content": "hi"}, {"role": "assistant", "content": "ok", "thinking": "hm"}],
        think=False)
    assert out == "sys|p|2|user:hi:;assistant:ok:hm;|false|true|"
    # fields Ollama's message struct does not have are errors, as in Go
    with pytest.raises(GoTemplateError, match="can't evaluate field Foo in type"):
        render_ollama(GoTemplate("{{ range .Messages }}{{ .Foo }}{{ end }}"),
                      messages=[{"role": "user", "content": "x"}])


def test_think_values():
    t = GoTemplate("{{ range .Messages }}{{ .Content }}{{ end }}"
                   "{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}"
                   "[{{ .ThinkLevel }}]")
    msgs = [{"role": "user", "content": "q"}]
    assert render_ollama_chat(t, msgs) == "q[]"
    assert render_ollama_chat(t, msgs, think=False) == "q<think>\n\n</think>\n\n[]"
    assert render_ollama_chat(t, msgs, think=True) == "q[medium]"
    assert render_ollama_chat(t, msgs, think="high") == "q[high]"
    with pytest.raises(ValueError):
        render_ollama_chat(t, msgs, think="extreme")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now>",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"unit": {"type": "string", "enum": ["c", "f"]},
                                  "city": {"type": "string", "description": "City"}}}}}]


def test_tools_and_tool_calls():
    t = GoTemplate("{{ if .Tools }}{{ .Tools }}{{ end }}|{{ range .Tools }}{{ .Function.Name }}:"
                   "{{ range $k, $p := .Function.Parameters.Properties }}{{ $k }}={{ $p.Type }},"
                   "{{ end }}{{ end }}|{{ range .Messages }}{{ range .ToolCalls }}"
                   "{{ .Function.Name }}{{ .Function.Arguments }}{{ end }}{{ end }}")
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}}]}]
    out = render_ollama_chat(t, msgs, tools=TOOLS)
    tools_json, props, calls = out.split("|")
    # Ollama's tool types print as their JSON (json.Marshal: properties of a Go map sorted,
    # '<' escaped, "description" always present on a function)
    assert tools_json == (
        '[{"type":"function","function":{"name":"get_weather","description":"Weather \\u003cnow\\u003e",'
        '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string",'
        '"description":"City"},"unit":{"type":"string","enum":["c","f"]}}}}}]')
    assert props == "get_weather:city=string,unit=string,"
    assert calls == 'get_weather{"city":"Paris","unit":"c"}'
    # no tools: .Tools is a nil list, false in if, printed as JSON null
    assert render_ollama_chat(GoTemplate("{{ .Tools }}{{ if .Tools }}!{{ end }}{{ .Messages }}"),
                              []) == "null[]"


def test_identifiers_and_ollama_checks():
    t = GoTemplate(R1_TEMPLATE)
    assert t.identifiers() == ["$", "$i", "$last", "content", "messages", "role", "system"]
    # Ollama refuses {{ template "x" }} without a pipeline (its Vars() fails on it)
    with pytest.raises(GoTemplateError, match="undefined template specified"):
        render_ollama_chat(GoTemplate('{{ define "x" }}a{{ end }}{{ template "x" }}'), [])


def test_ollama_chat_messages():
    req = [{"role": "user", "content": "hi"}]
    assert ollama_chat_messages(req, system="S", model_messages=[{"role": "user", "content": "m"}]) \
        == [{"role": "system", "content": "S"}, {"role": "user", "content": "m"},
            {"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "mine"}] + req
    assert ollama_chat_messages(own, system="S") == own
