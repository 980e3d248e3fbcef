"""The `finback` client commands against a live server of this module's own: pull, list, show,
create, cp, rm, run (one-shot, verbose, a GGUF path), ps, stop, and one-line errors."""

import json
import re
import urllib.request

import pytest

from finback.store.modelfile import parse_modelfile

MODEL = "smollm2:135m"
FAST = ["--temperature", "0", "--max-tokens", "12"]
QUESTION = "What is the capital of France?"
TEMPLATE = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")
STATS = ("total duration:", "load duration:", "prompt eval count:", "prompt eval duration:",
         "prompt eval rate:", "eval count:", "eval duration:", "eval rate:")


def ok(p):
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def one_line_error(p, needle):
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), p.stderr
    assert needle in lines[0], p.stderr


def rows(text):
    lines = text.strip().splitlines()
    return lines[0].split(), [re.split(r"\s{2,}", ln.strip()) for ln in lines[1:]]


def api(live, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(live.url + path, data=data, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_create_uploads_a_gguf_and_show_modelfile_round_trips(live, smollm2_path, tmp_path):
    (tmp_path / "Modelfile").write_text(
        f"FROM {smollm2_path}\n"
        f'TEMPLATE """{TEMPLATE}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
        "PARAMETER num_predict 8\n"
        "SYSTEM You are terse.\n")
    p = ok(live.call(["create", "terse:v1", "-f", str(tmp_path / "Modelfile")]))
    assert "copying file" in p.stderr and "success" in p.stderr  # the blob went up: the store was empty
    assert list((live.store / "blobs").iterdir())
    mf = parse_modelfile(ok(live.call(["show", "terse:v1", "--modelfile"])).stdout)
    assert mf.template == TEMPLATE and mf.system == "You are terse."
    assert mf.parameters["stop"] == ["<|im_end|>", "<|im_start|>"] and mf.parameters["num_predict"] == 8
    assert ok(live.call(["show", "terse:v1", "--template"])).stdout.rstrip("\n") == TEMPLATE.rstrip("\n")
    params = ok(live.call(["show", "terse:v1", "--parameters"])).stdout
    assert params.count("stop") == 2 and "num_predict" in params
    # a relative FROM is read relative to the Modelfile; a missing file is an error, not a name
    (tmp_path / "Bad").write_text("FROM ./missing.gguf\n")
    one_line_error(live.call(["create", "bad", "-f", str(tmp_path / "Bad")]), "missing.gguf")
    (tmp_path / "Worse").write_text("FROM x\nPARAMETER nonsense 1\n")
    one_line_error(live.call(["create", "bad", "-f", str(tmp_path / "Worse")]), "nonsense")


def test_create_from_a_safetensors_folder(live, tmp_path):
    import struct

    folder = tmp_path / "st"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                    "max_position_embeddings": 4096}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes.md").write_text("not part of the model")
    for i in (1, 2):
        hdr = json.dumps({"w": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]}}).encode()
        data = struct.pack("<Q", len(hdr)) + hdr + bytes([i]) * 64  # two different shards
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(data)
    (tmp_path / "Modelfile").write_text("FROM ./st\nPARAMETER temperature 0.6\n")  # relative to the Modelfile
    p = ok(live.call(["create", "st-model", "-f", str(tmp_path / "Modelfile")]))
    assert p.stderr.count("copying file") == 4  # the weights, config.json and tokenizer.json went up
    out = ok(live.call(["show", "st-model"])).stdout
    assert "qwen2" in out and "4096" in out and "BF16" in out and "temperature" in out
    ok(live.call(["rm", "st-model"]))


def test_pull_with_progress_and_list(live):
    p = ok(live.call(["pull", MODEL]))
    assert "pulling manifest" in p.stderr and "success" in p.stderr
    assert re.search(r"pulling [0-9a-f]{12}", p.stderr)  # the layer's progress bar
    header, table = rows(ok(live.call(["list"])).stdout)
    assert header == ["NAME", "ID", "SIZE", "MODIFIED"]
    by_name = {r[0]: r for r in table}
    assert set(by_name) == {MODEL, "terse:v1"}
    name, ident, size, modified = by_name[MODEL]
    assert re.fullmatch(r"[0-9a-f]{12}", ident) and size.endswith(" MB") and modified.endswith("ago")
    assert [r[0] for r in rows(ok(live.call(["ls"])).stdout)[1]] == [r[0] for r in table]


def test_show_summary(live):
    out = ok(live.call(["show", MODEL])).stdout
    for needle in ("Model", "architecture", "llama", "parameters", "134.52M", "context length",
                   "quantization", "Q4_1", "Capabilities", "completion"):
        assert needle in out
    one_line_error(live.call(["show", "no-such-model:7b"]), "not found")
    one_line_error(live.call(["show", MODEL, "--template", "--system"]), "only one of")


def test_cp_and_rm(live):
    assert "copied 'terse:v1' to 'copy:latest'" in ok(live.call(["cp", "terse:v1", "copy:latest"])).stdout
    assert "copy:latest" in ok(live.call(["list"])).stdout
    p = ok(live.call(["rm", "copy:latest", "terse:v1"]))
    assert "deleted 'copy:latest'" in p.stdout and "deleted 'terse:v1'" in p.stdout
    names = [r[0] for r in rows(ok(live.call(["list"])).stdout)[1]]
    assert names == [MODEL]
    one_line_error(live.call(["rm", "copy:latest"]), "not found")
    one_line_error(live.call(["cp", "nothing:here", "x"]), "not found")


def test_run_one_shot_verbose(live):
    p = ok(live.run(["run", MODEL, QUESTION, *FAST, "--verbose"]))  # a real process, as a user runs it
    expected = api(live, "/api/chat", {"model": MODEL, "stream": False,
                                       "messages": [{"role": "user", "content": QUESTION}],
                                       "options": {"temperature": 0, "num_predict": 12}})["message"]["content"]
    assert expected.strip() and p.stdout.strip() == expected.strip()
    for line in STATS:
        assert line in p.stderr
    assert re.search(r"eval rate:\s+\d+\.\d\d tokens/s", p.stderr)
    assert re.search(r"total duration:\s+[\d.]+(s|ms)\n", p.stderr)
    # piped stdin is the prompt, as with ollama; no --verbose: no statistics
    p = ok(live.call(["run", MODEL, *FAST], stdin=QUESTION + "\n"))
    assert p.stdout.strip() == expected.strip() and "eval count" not in p.stderr


def test_run_a_gguf_path_through_the_server(live, smollm2_path):
    p = ok(live.call(["run", smollm2_path, "Say hi.", "--temperature", "0", "--max-tokens", "4"]))
    assert p.stdout.strip()
    assert smollm2_path in [m["name"] for m in api(live, "/api/ps")["models"]]
    ok(live.call(["stop", smollm2_path]))


def test_ps_and_stop(live):
    header, table = rows(ok(live.call(["ps"])).stdout)
    assert header == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = {r[0]: r for r in table}[MODEL]
    assert row[3] == "100% CPU" and row[-1].endswith("from now")
    ok(live.call(["stop", MODEL]))
    assert MODEL not in ok(live.call(["ps"])).stdout
    ok(live.call(["stop", MODEL]))  # known but not running: nothing to do
    one_line_error(live.call(["stop", "no-such-model:7b"]), "couldn't find model")


@pytest.mark.parametrize("args,needle", [
    (["run", "no-such-model:7b", "hi"], "model 'no-such-model:7b' not found"),
    (["run", MODEL, "hi", "-o", "nonsense=1"], "unknown parameter"),
    (["run", MODEL, "hi", "-o", "num_predict=many"], "invalid int value"),
    (["run", MODEL, "hi", "--temperature", "-1"], "temperature"),  # the server's 400, as one line
])
def test_errors_are_one_line(live, args, needle):
    p = live.run(args) if needle.startswith("model") else live.call(args)
    one_line_error(p, needle)
