"""`finback fit MODEL`: will it fit, on how many GPUs, with how long a context.

Computed here, from the catalogue or the model's headers (finback/hardware/fit.py); no server, no
download. `--json` prints one object (fits, min_gpus, max_context, per_gpu_bytes and the parts).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="what a model needs per GPU (or in RAM), and the fewest GPUs that hold it")
    p.add_argument("model", help="catalogue name (deepseek-r1:671b-q2_K_XL), GGUF file or safetensors folder")
    p.add_argument("--gpus", type=int, help="number of GPUs (default: those detected; 0: size it in RAM)")
    p.add_argument("--gpu-memory", help="memory of one GPU (80GiB, 96GB, 24G = GiB; default: detected), "
                                        "or RAM with --gpus 0")
    p.add_argument("--context", type=int, default=32768, help="tokens a sequence may reach (default 32768)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences at full context at once (default 1)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, dest="tensor_parallel_size")
    p.add_argument("--pipeline-parallel-size", "--pp", type=int, dest="pipeline_parallel_size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "float32"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (no graph memory)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="largest tensor parallel group (default 8)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=cmd_fit)


def cmd_fit(ns: argparse.Namespace) -> int:
    from finback.hardware.fit import FitError, plan, report_rows

    try:
        report = plan(ns.model, gpus=ns.gpus, gpu_memory=ns.gpu_memory, context=ns.context,
                      concurrency=ns.concurrency, tensor_parallel_size=ns.tensor_parallel_size,
                      pipeline_parallel_size=ns.pipeline_parallel_size,
                      gpu_memory_utilization=ns.gpu_memory_utilization, kv_cache_dtype=ns.kv_cache_dtype,
                      dtype=ns.dtype, enforce_eager=ns.enforce_eager, gpus_per_node=ns.gpus_per_node)
    except FitError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"finback fit {report.model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for what, value in report_rows(report):
        style = ("green" if report.fits else "red") if what == "fits" else None
        table.add_row(what, value, style=style)
    Console().print(table)
    return 0
