"""Reasoning in assistant turns sent back in the history is removed before templating (DeepSeek's
advice), unless FINBACK_KEEP_HISTORY_REASONING=1."""

from finback.prompt.gotemplate import GoTemplate
from finback.server.manager import LoadedModel
from finback.server.ollama import _render_chat

MESSAGES = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "thinking": "add them"},
            {"role": "user", "content": "and 3+3?"}]


def _model():
    template = GoTemplate("{{ range .Messages }}{{ .Role }}:{{ .Content }}|{{ end }}")
    return LoadedModel(name="m", path="", engine=None, template=template, template_kind="go", system="",
                       params={}, messages=[], details={}, digest="", size=0, load_duration_ns=0)


def test_history_reasoning_is_stripped(monkeypatch):
    monkeypatch.delenv("FINBACK_KEEP_HISTORY_REASONING", raising=False)
    prompt, _ = _render_chat(_model(), MESSAGES, None, None)
    assert prompt == "user:2+2?|assistant:4|user:and 3+3?|"


def test_history_reasoning_can_be_kept(monkeypatch):
    monkeypatch.setenv("FINBACK_KEEP_HISTORY_REASONING", "1")
    prompt, _ = _render_chat(_model(), MESSAGES, None, None)
    assert "add them" in prompt and "assistant:<think>" in prompt
