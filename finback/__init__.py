"""finback: the DeepSeek-R1 family on your own hardware."""

__version__ = "0.1.0"

from finback.engine.sampling import SamplingParams  # noqa: E402


def __getattr__(name):
    if name == "LLM":
        from finback.engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
