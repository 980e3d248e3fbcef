import pytest
from fbtest import tiny_hf_model, tokenizer_metadata, write_gguf


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory, smollm2_path):
    """A tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads: splits over 2 ranks either way)
    with SmolLM2's tokenizer and chat template, as a GGUF the server can serve by path."""
    model = tiny_hf_model("llama", seed=3, vocab=49152, hidden=64)
    path = tmp_path_factory.mktemp("tiny_chat") / "tiny-chat.gguf"
    return str(write_gguf(model, str(path), "F16", tokenizer_metadata(smollm2_path)))
