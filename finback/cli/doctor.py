"""`finback doctor`: GPUs, versions, NCCL environment, peer access, network, and an all-reduce
bandwidth test with the transport NCCL chose (finback/hardware/doctor.py). Runs locally, no server.
"""

from __future__ import annotations

import argparse
import json


def _sizes(text: str) -> tuple[int, ...]:
    from finback.hardware.fit import FitError, parse_bytes

    try:
        return tuple(parse_bytes(s if s.strip()[-1:].isalpha() else s + "B") for s in text.split(",") if s.strip())
    except FitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check GPUs, NCCL and the network; measure all-reduce bandwidth")
    p.add_argument("--nprocs", type=int, help="processes on this node (default: one per GPU; 2 with gloo)")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl with GPUs, else gloo")
    p.add_argument("--sizes", type=_sizes, default=None, metavar="LIST",
                   help="all-reduce sizes, e.g. 1MiB,16MiB,128MiB (the default); a bare number is bytes")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300, help="seconds before the workers are given up")
    p.add_argument("--no-bench", action="store_true", help="skip the all-reduce test")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, help="default: a free port (one node), 29511 (several)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(ns: argparse.Namespace) -> int:
    from finback.hardware.doctor import DEFAULT_SIZES, diagnose

    report = diagnose(bench=not ns.no_bench, nprocs=ns.nprocs, backend=ns.backend, sizes=ns.sizes or DEFAULT_SIZES,
                      iters=ns.iters, warmup=ns.warmup, timeout=ns.timeout, nnodes=ns.nnodes, node_rank=ns.node_rank,
                      master_addr=ns.master_addr, master_port=ns.master_port)
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    bench = report.get("allreduce") or {}
    return 1 if bench.get("error") or bench.get("correct") is False else 0


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from finback.hardware.doctor import TRANSPORT_NAMES
    from finback.hardware.fit import human

    con = Console()
    t = Table(title="versions", show_header=False, title_justify="left")
    for k, v in report["versions"].items():
        t.add_row(k, v or "-")
    con.print(t)

    if report["gpus"]:
        t = Table(title="GPUs", title_justify="left")
        for col in ("#", "name", "memory", "compute capability", "SMs"):
            t.add_column(col)
        for g in report["gpus"]:
            t.add_row(str(g["index"]), g["name"], human(g["memory_bytes"]), g["compute_capability"],
                      str(g["multiprocessors"]))
        con.print(t)
        n = len(report["gpus"])
        if n > 1:
            t = Table(title="peer access (row can read column)", title_justify="left")
            t.add_column("")
            for j in range(n):
                t.add_column(str(j))
            for i, row in enumerate(report["peer_access"]):
                t.add_row(str(i), *("-" if v is None else "[green]yes[/]" if v else "[red]no[/]" for v in row))
            con.print(t)
    else:
        con.print("no CUDA GPU visible to torch")

    env = report["environment"]
    t = Table(title="environment (NCCL_*, GLOO_*, ...)", show_header=False, title_justify="left")
    for k, v in env.items():
        t.add_row(k, v)
    con.print(t if env else "environment: no NCCL_* / GLOO_* variables set")

    net = report["network"]
    t = Table(title="network", title_justify="left")
    for col in ("interface", "up", "speed", "addresses"):
        t.add_column(col)
    for i in net["interfaces"]:
        t.add_row(i["name"], "yes" if i["up"] else "no", f"{i['speed_mbps']} Mb/s" if i["speed_mbps"] else "-",
                  ", ".join(i["addresses"]))
    con.print(t)
    con.print("RDMA devices: " + (", ".join(net["rdma_devices"]) or "none (/sys/class/infiniband is empty)"))

    bench = report.get("allreduce")
    if not bench:
        return
    if "skipped" in bench:
        con.print(f"all-reduce: skipped: {bench['skipped']}")
        return
    t = Table(title=f"all-reduce, {bench['backend']}, {bench['world_size']} ranks "
                    f"({bench['local_processes']} on this node), float32", title_justify="left")
    for col in ("size", "time (us)", "algbw (GB/s)", "busbw (GB/s)"):
        t.add_column(col, justify="right")
    for r in bench["rows"]:
        t.add_row(human(r["bytes"]), f"{r['time_us']:.1f}", f"{r['algbw_gbps']:.2f}", f"{r['busbw_gbps']:.2f}")
    con.print(t)
    if bench.get("correct") is False:
        con.print("[red]the all-reduce returned a wrong sum[/]")
    if bench.get("error"):
        con.print(f"[red]error: {bench['error']}[/]")
        con.print(bench.get("log_tail") or "", markup=False, highlight=False)
    nccl = bench.get("nccl")
    if nccl:
        t = Table(title=f"NCCL {nccl.get('version') or ''} transports (from NCCL_DEBUG=INFO)", title_justify="left")
        t.add_column("transport")
        t.add_column("channel connections", justify="right")
        for kind, count in sorted(nccl["transports"].items(), key=lambda kv: -kv[1]):
            t.add_row(TRANSPORT_NAMES.get(kind, kind), str(count))
        con.print(t if nccl["transports"] else "NCCL printed no transport lines (NCCL_DEBUG overridden?)")
        for tip in bench.get("advice") or []:
            con.print(f"[yellow]advice:[/] {tip}")
