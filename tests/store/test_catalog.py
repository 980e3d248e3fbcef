"""The DeepSeek-R1 catalogue: names and aliases, the figures people quote, and file selection on
listings shaped like the real repos (no network)."""

from __future__ import annotations

import pytest

from finback.store import catalog
from finback.store.catalog import UnknownModel, lookup
from finback.store.names import ModelNotFound
from finback.store.pull import PullError, RemoteFile, gguf_sets, select_entry_files, select_quant

GB = 10 ** 9


def test_every_tag_resolves_and_is_complete():
    sizes = ["1.5b", "7b", "8b", "14b", "32b", "70b"]
    for s in sizes:
        for q in ("q4_K_M", "q8_0", "fp16", "bf16"):
            e = lookup(f"deepseek-r1:{s}-{q}")
            assert e.format == "gguf" and e.hf_repo.startswith("unsloth/") and e.hf_repo.endswith("-GGUF")
            assert e.modelscope_repo and e.patterns and e.size_bytes > 0 and e.parameter_count > 1e9
            assert e.min_ram_gb >= e.min_vram_gb > 0 and e.hardware
        assert lookup(f"deepseek-r1:{s}") == lookup(f"deepseek-r1:{s}-q4_K_M")
    for t in ("iq1_s", "iq1_m", "iq2_xxs", "q2_K_XL", "q4_K_M", "q8_0", "bf16", "fp8"):
        e = lookup(f"deepseek-r1:671b-{t}")
        assert e.split and e.parameter_count == 671_026_419_200 and e.family in ("deepseek2", "deepseek_v3")
    for e in catalog.entries():
        assert lookup(e.name) is e and lookup(e.name.upper()) is e
        for a in e.aliases:
            assert lookup(f"deepseek-r1:{a}") is e


def test_quoted_figures():
    assert lookup("deepseek-r1:latest").tag == "7b-q4_K_M" == lookup("deepseek-r1").tag
    assert lookup("deepseek-r1:7b").size_bytes == int(4.68 * GB)
    assert lookup("deepseek-r1:7b").parameter_size == "7.6B" and lookup("deepseek-r1:7b").family == "qwen2"
    assert lookup("deepseek-r1:8b").family == "llama" and lookup("deepseek-r1:70b").architecture == "LlamaForCausalLM"
    for tag, gb, folder in (("671b-iq1_s", 131, "DeepSeek-R1-UD-IQ1_S"), ("671b-iq1_m", 158, "DeepSeek-R1-UD-IQ1_M"),
                            ("671b-iq2_xxs", 183, "DeepSeek-R1-UD-IQ2_XXS"),
                            ("671b-q2_K_XL", 212, "DeepSeek-R1-UD-Q2_K_XL")):
        e = lookup(f"deepseek-r1:{tag}")
        assert e.size_bytes == gb * GB and e.hf_repo == "unsloth/DeepSeek-R1-GGUF" and e.patterns == (f"{folder}/*.gguf",)
        assert e.quant.startswith("UD-")
    fp8 = lookup("deepseek-r1:671b-fp8")
    assert (fp8.format, fp8.hf_repo, fp8.modelscope_repo) == ("safetensors", "deepseek-ai/DeepSeek-R1",
                                                              "deepseek-ai/DeepSeek-R1")
    assert lookup("deepseek-r1:671b").quant == "Q4_K_M" and lookup("deepseek-r1:671b-fp16").quant == "BF16"
    assert lookup("deepseek-r1:14b-qwen-distill-q8_0").tag == "14b-q8_0"
    assert lookup("registry.ollama.ai/library/deepseek-r1:32b").tag == "32b-q4_K_M"
    assert lookup("deepseek-r1:671B-Q2_K_xl").tag == "671b-q2_K_XL"


@pytest.mark.parametrize("name,close", [
    ("deepseek-r1:7bb", "deepseek-r1:7b"), ("deepsek-r1:7b", "deepseek-r1:7b"),
    ("deepseek-r1:671b-iq1", "deepseek-r1:671b-iq1_s"), ("deepseek-r1:7b-q4_0", "deepseek-r1:7b-q4_K_M"),
])
def test_unknown_names_list_close_ones(name, close):
    with pytest.raises(UnknownModel) as ei:
        lookup(name)
    assert close in ei.value.suggestions and close in str(ei.value)
    assert isinstance(ei.value, ModelNotFound) and isinstance(ei.value, ValueError)
    with pytest.raises(UnknownModel):
        lookup("hf.co/unsloth/DeepSeek-R1-GGUF:UD-IQ1_S")


def test_embedded_names():
    assert catalog.is_embedded("smollm2:135m") and catalog.is_embedded("SmolLM2") and catalog.is_embedded("default")
    assert not catalog.is_embedded("deepseek-r1") and not catalog.is_embedded("hf.co/x/smollm2:135m")


def files(*paths):
    return [RemoteFile(p, 1, None) for p in paths]


def test_file_selection_on_real_repo_layouts():
    r1 = files("README.md", "DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-00001-of-00002.gguf",
               "DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-00002-of-00002.gguf",
               *[f"DeepSeek-R1-UD-IQ1_S/DeepSeek-R1-UD-IQ1_S-0000{i}-of-00003.gguf" for i in (3, 1, 2)],
               "DeepSeek-R1-UD-Q2_K_XL/DeepSeek-R1-UD-Q2_K_XL-00001-of-00001.gguf")
    got = select_entry_files(r1, lookup("deepseek-r1:671b-iq1_s"))
    assert [f.path.rsplit("-", 3)[-3] for f in got] == ["00001", "00002", "00003"]
    assert len(select_entry_files(r1, lookup("deepseek-r1:671b"))) == 2
    with pytest.raises(ModelNotFound, match="UD-Q2_K_XL"):
        select_entry_files(r1, lookup("deepseek-r1:671b-iq1_m"))  # the error lists what is there
    distill = files("DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf", "DeepSeek-R1-Distill-Llama-70B-Q4_K_S.gguf",
                    "DeepSeek-R1-Distill-Llama-70B-Q8_0/DeepSeek-R1-Distill-Llama-70B-Q8_0-00001-of-00002.gguf",
                    "DeepSeek-R1-Distill-Llama-70B-Q8_0/DeepSeek-R1-Distill-Llama-70B-Q8_0-00002-of-00002.gguf",
                    "DeepSeek-R1-Distill-Llama-70B-F16-00001-of-00002.gguf",
                    "DeepSeek-R1-Distill-Llama-70B-F16-00002-of-00002.gguf")
    assert [f.path for f in select_entry_files(distill, lookup("deepseek-r1:70b"))] == [
        "DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf"]
    assert len(select_entry_files(distill, lookup("deepseek-r1:70b-q8_0"))) == 2
    assert len(select_entry_files(distill, lookup("deepseek-r1:70b-fp16"))) == 2
    # hf.co quant tags: exact token match, shortest set wins, :latest -> Q4_K_M
    assert select_quant(distill, "Q4_K_S")[0].path.endswith("Q4_K_S.gguf")
    assert select_quant(distill, "latest")[0].path.endswith("Q4_K_M.gguf")
    assert select_quant(r1, "ud-iq1_s")[0].path.endswith("00001-of-00003.gguf")
    with pytest.raises(PullError, match="incomplete"):
        gguf_sets(files("m-00001-of-00003.gguf", "m-00003-of-00003.gguf"))
    assert gguf_sets(files("x.gguf", "mmproj-x-f16.gguf", "a.bin")) == {"x.gguf": files("x.gguf")}
