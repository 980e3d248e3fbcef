"""finback: the DeepSeek-R1 family on your own hardware."""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import finback` stays cheap (the CLI's client commands never load torch)
    if name == "LLM":
        from finback.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from finback.engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
