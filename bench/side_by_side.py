"""finback and llama.cpp on the same GGUF files, one GPU, one run: decode and prefill side by side.

llama.cpp (the engine inside Ollama) is built by the peer kit (`.peer/`, filled by
`../shared/peer/prepare.sh`; see its README), which also writes random-weight R1-Distill-Qwen GGUFs
of the real shapes with the real tokenizer: F16, then Q4_K_M by llama-quantize. Both engines then
read those same files: llama.cpp through its own llama-bench and llama-batched-bench, finback through
bench/decode.py --gguf-files (F16 files computed in bf16; Q4_K_M blocks kept on the GPU).

Two commands on the same warm GPU machine (the build alone takes ~7 of the 10 minutes one command
may run):

  python bench/side_by_side.py --build      # build llama.cpp into $PEERBUILD, write the files
  python bench/side_by_side.py              # both engines' benchmarks, then the table

Columns, per file and engine:
  batch-1 tok/s    llama.cpp: llama-bench tg128 (128 tokens after an empty context), and
                   llama-batched-bench B=1 (128 prompt + 128 generated: finback's own measure);
                   finback: 128 prompt + 128 generated, tokens after the first / decode time
  N conc tok/s     llama.cpp: llama-batched-bench S_TG at B=N (128 + 128 each); finback: the same
                   loads, generated tokens / time of the decode-only steps
  prefill512 tok/s llama.cpp: llama-bench pp512; finback: one 512-token prompt / its step's time
Tables land in --out (default out/side_by_side): llama.cpp's markdown, finback's JSON, the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(ROOT, ".peer")
TYPES = {"f16": "F16", "q4_k_m": "Q4_K"}  # file suffix -> how llama-bench's model column names the type


def peerbuild() -> str:
    return os.environ.get("PEERBUILD", os.path.join(os.path.expanduser("~"), "peerbuild"))


def files(sizes: list[str]) -> list[tuple[str, str, str]]:
    return [(s, t, os.path.join(peerbuild(), "models", f"{s}-{t}.gguf")) for s in sizes for t in TYPES]


def _num(cell: str) -> float:
    return float(cell.split("±")[0].strip())


def parse_llama_bench(path: str, order: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, float]]:
    """llama-bench markdown tables -> {(size, type): {"pp512": t/s, "tg128": t/s}}, by the model column
    ("qwen2 1.5B F16", "qwen2 7B Q4_K - Medium") or, where it names no size, by the table's place in
    llamacpp.sh's order (one table per file)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    head: list[str] = []
    table = -1
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "model":
            head, table = cells, table + 1
            continue
        if not head or set(cells[0]) <= set("-: "):
            continue
        row = dict(zip(head, cells))
        m = re.search(r"(\d+(?:\.\d+)?)B\s+(\S+)", row.get("model", ""))
        kind = m and next((t for t, name in TYPES.items() if m.group(2).upper().startswith(name)), None)
        if m and kind:
            key = (m.group(1).lower() + "b", kind)
        elif table < len(order):
            key = order[table]
        else:
            continue
        out.setdefault(key, {})[row["test"]] = _num(row["t/s"])
    return out


def parse_batched(path: str) -> dict[int, float]:
    """llama-batched-bench rows -> {B: S_TG t/s}."""
    out: dict[int, float] = {}
    head: list[str] = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "S_TG t/s" in cells:
            head = cells
        elif head and cells and cells[0].isdigit():
            row = dict(zip(head, cells))
            out[int(row["B"])] = float(row["S_TG t/s"])
    return out


def run(cmd: list[str], env: dict | None = None, check: bool = True) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, env={**os.environ, **(env or {})}, cwd=ROOT).returncode


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="only build llama.cpp and write the model files")
    ap.add_argument("--sizes", default="1.5b,7b")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "side_by_side"))
    ap.add_argument("--skip-llamacpp", action="store_true", help="reuse llama.cpp's tables already in --out")
    ap.add_argument("--skip-finback", action="store_true", help="reuse finback.json already in --out")
    a = ap.parse_args()
    sizes = [s for s in a.sizes.split(",") if s]
    conc = [int(c) for c in a.concurrency.split(",") if c]
    script = os.path.join(PEER, "llamacpp.sh")
    if not os.path.exists(script):
        sys.exit(f"{script} is missing: run ../shared/peer/prepare.sh here first and carry .peer/ to the GPU machine")
    os.makedirs(a.out, exist_ok=True)
    if a.build:
        run(["bash", script, *sizes], {"MODELS_ONLY": "1", "OUT": a.out})
        return
    bench_bin = os.path.join(peerbuild(), "lcp", "build", "bin", "llama-bench")
    missing = [p for _, _, p in files(sizes) if not os.path.exists(p)]
    if not os.path.exists(bench_bin) or missing:
        sys.exit(f"llama.cpp is not built or the files are missing ({bench_bin}; {missing}): run "
                 f"`python bench/side_by_side.py --build` first, on the same machine")
    if not a.skip_llamacpp:
        for name in os.listdir(a.out):
            if name.endswith(".md"):  # llamacpp.sh appends: start clean
                os.remove(os.path.join(a.out, name))
        npl = ",".join(str(c) for c in [1] + conc)
        # llamacpp.sh ends on `[[ -n ${LONG:-} ]] && ...`, so it exits 1 when LONG is unset even after
        # every table was written: judge it by its tables, not its status
        rc = run(["bash", script, *sizes], {"OUT": a.out, "NPL": npl}, check=False)
        table = os.path.join(a.out, "llama-bench.md")
        if not os.path.exists(table) or not os.path.getsize(table):
            sys.exit(f"llama.cpp's benchmarks wrote no llama-bench table (exit status {rc})")
    fb_json = os.path.join(a.out, "finback.json")
    if not a.skip_finback:
        run([sys.executable, os.path.join(HERE, "decode.py"), "--gguf-files", ",".join(p for _, _, p in files(sizes)),
             "--concurrency", ",".join(map(str, conc)), "--json", fb_json])
    with open(fb_json, encoding="utf-8") as f:
        fb = json.load(f)
    fb_rows = {r["model"]: r for r in fb["rows"]}
    lb_path = os.path.join(a.out, "llama-bench.md")
    lb = parse_llama_bench(lb_path, [(s, t) for s, t, _ in files(sizes)]) if os.path.exists(lb_path) else {}
    gpu = fb["device"]
    if os.path.exists(os.path.join(a.out, "gpu.txt")):
        with open(os.path.join(a.out, "gpu.txt"), encoding="utf-8") as f:
            gpu = f.read().strip() or gpu
    head = ["file", "engine", "batch-1 tok/s", "batch-1 128+128 tok/s"] + [f"{c} conc tok/s" for c in conc] + \
        ["prefill512 tok/s"]
    lines = [f"GPU: {gpu}; finback {fb['generated']} generated per request; llama.cpp of llama-cpp-python 0.3.36",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size, kind, path in files(sizes):
        name = os.path.basename(path)
        bb = parse_batched(os.path.join(a.out, f"batched-{size}-{kind}.md"))
        lc = lb.get((size, kind), {})
        r = fb_rows.get(name)
        lrow = [lc.get("tg128"), bb.get(1)] + [bb.get(c) for c in conc] + [lc.get("pp512")]
        frow = [None, r["batch1"], *(r["concurrent"].get(str(c)) for c in conc), r["prefill512"]] if r else \
            [None] * len(lrow)
        ratio = [None if (x is None or y is None or y == 0) else x / y
                 for x, y in zip([r["batch1"] if r else None] + frow[1:], [lrow[0]] + lrow[1:])]
        for engine, vals in (("llama.cpp", lrow), ("finback", frow)):
            cells = [fmt(v, 1 if i < 2 else 0) for i, v in enumerate(vals)]
            lines.append("| " + " | ".join([name, engine, *cells]) + " |")
        lines.append("| " + " | ".join([name, "finback / llama.cpp"] + [fmt(v, 2) for v in ratio]) + " |")
    lines.append("")
    lines.append("finback's batch-1 figure is after a 128-token prompt; its ratio in the first column is against "
                 "llama-bench tg128, in the second against llama-batched-bench B=1 (the same load).")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(a.out, "side_by_side.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
