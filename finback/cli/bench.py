"""`finback bench URL`: a load test of any Ollama- or OpenAI-compatible server (finback, Ollama,
vLLM, llama.cpp's llama-server), in the spirit of vLLM's `benchmark_serving` with Ollama's API too.

Each level of a run is either closed-loop (`--concurrency C`: C clients, each sending its next
request when its last one ends) or open-loop (`--request-rate R`: requests arrive as a Poisson
process of R per second, whether or not earlier ones have ended; `inf` sends all at once), with
`--num-prompts` requests per level (at least C). Every level gets fresh random prompts, so a
server's prefix cache cannot answer one level from the last. The terminal shows a progress bar, then
a throughput table and a latency table (mean, p50, p90, p99 in ms); `--json` writes one entry per
level, `--plot` a PNG of latency against output throughput. With `--slo-ttft-ms` / `--slo-tpot-ms`
a level holds the SLO when no request failed and the `--slo-percentile` of TTFT and TPOT are within
bounds; the run then reports the highest concurrency that holds it, searched by doubling from 1 and
bisecting (or among the `--concurrency` levels given).

The client runs on the machine it measures from: on a small machine it competes with a local server
for the same cores, which the figures include.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finback.cli.bench_client import RequestResult, Target

PERCENTILES = (50, 90, 99)


@dataclass
class Level:
    concurrency: int | None = None
    rate: float | None = None  # requests per second; inf: all at once
    max_concurrency: int | None = None  # cap on requests in flight for a rate level

    @property
    def label(self) -> str:
        if self.rate is None:
            return f"c={self.concurrency}"
        cap = f" (max {self.max_concurrency})" if self.max_concurrency else ""
        return f"rate={'inf' if math.isinf(self.rate) else f'{self.rate:g}'}/s{cap}"


# ------------------------------------------------------------------------------------ running

async def run_level(client, target: Target, prompts: list[tuple[str, int]], level: Level, rng: random.Random,
                    on_done=None) -> tuple[list[RequestResult], float]:
    """Send every prompt under the level's discipline; returns the results and the wall time."""
    from finback.cli.bench_client import send

    results: list[RequestResult | None] = [None] * len(prompts)

    async def one(i: int):
        results[i] = await send(client, target, *prompts[i])
        if on_done:
            on_done(results[i])

    t0 = time.perf_counter()
    if level.rate is None:
        it = iter(range(len(prompts)))

        async def worker():
            for i in it:
                await one(i)
        await asyncio.gather(*(worker() for _ in range(level.concurrency)))
    else:
        sem = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None

        async def gated(i):
            if sem is None:
                return await one(i)
            async with sem:
                return await one(i)
        tasks = []
        for i in range(len(prompts)):
            tasks.append(asyncio.create_task(gated(i)))
            if not math.isinf(level.rate) and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(level.rate))
        await asyncio.gather(*tasks)
    return [r for r in results if r is not None], time.perf_counter() - t0


def _stats(values: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(level: Level, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """One JSON entry: counts, throughputs (per second of the level's wall time), latency stats in ms."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_counts = [r.prompt_tokens for r in ok if isinstance(r.prompt_tokens, int)]
    in_tokens = sum(in_counts)
    return {
        "label": level.label, "concurrency": level.concurrency,
        "request_rate": "inf" if level.rate is not None and math.isinf(level.rate) else level.rate,
        "max_concurrency": level.max_concurrency,
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": in_tokens / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "mean_input_tokens": in_tokens / len(in_counts) if in_counts else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itls]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def holds(entry: dict, ns) -> bool:
    """Whether a level meets the SLOs: no failures, the chosen percentile of TTFT/TPOT within bounds."""
    if entry["failed"] or not entry["completed"]:
        return False
    key = f"p{ns.slo_percentile}"
    for metric, bound in (("ttft_ms", ns.slo_ttft_ms), ("tpot_ms", ns.slo_tpot_ms)):
        if bound is not None and (entry[metric][key] is None or entry[metric][key] > bound):
            return False
    return True


# ------------------------------------------------------------------------------------ output

def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_tables(console, entries: list[dict], header: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Throughput — {header}", title_justify="left")
    for col in ("level", "ok", "failed", "time s", "req/s", "in tok/s", "out tok/s", "mean in", "mean out"):
        t.add_column(col, justify="left" if col == "level" else "right", no_wrap=col == "level")
    for e in entries:
        t.add_row(e["label"], str(e["completed"]), str(e["failed"]), _fmt(e["duration_s"], 2),
                  _fmt(e["request_throughput"], 2), _fmt(e["input_throughput"]), _fmt(e["output_throughput"]),
                  _fmt(e["mean_input_tokens"]), _fmt(e["mean_output_tokens"]))
    console.print(t)
    t = Table(title="Latency (ms)", title_justify="left")
    t.add_column("level", no_wrap=True)
    t.add_column("metric")
    for col in ("mean", *(f"p{p}" for p in PERCENTILES)):
        t.add_column(col, justify="right")
    for e in entries:
        for i, (name, key) in enumerate((("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                                         ("E2E", "e2e_ms"))):
            s = e[key]
            t.add_row(e["label"] if i == 0 else "", name, _fmt(s["mean"]), *(_fmt(s[f"p{p}"]) for p in PERCENTILES),
                      end_section=i == 3)
    console.print(t)
    for e in entries:
        for err, n in e["errors"].items():
            console.print(f"[red]{escape(e['label'])}: {n} failed: {escape(err)}[/red]")


def write_plot(path: str, entries: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [e["output_throughput"] for e in entries]
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for p, style in ((50, "o-"), (99, "s--")):
            ys = [e[key][f"p{p}"] for e in entries]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{name} p{p}")
        for e, x in zip(entries, xs):
            y = e[key]["p50"]
            if y is not None:
                ax.annotate(e["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ the command

def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> list[int]:
    vals = _floats(text)
    if not vals or any(v != int(v) or v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return [int(v) for v in vals]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="load-test an Ollama- or OpenAI-compatible server (TTFT, TPOT, throughput)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("url", nargs="?", help="server base URL (default: FINBACK_HOST / OLLAMA_HOST)")
    p.add_argument("--model", "-m", help="model name (default: the server's first listed model)")
    p.add_argument("--api", choices=["ollama", "openai"], help="default: ollama if /api/version answers, else openai")
    p.add_argument("--chat", action="store_true",
                   help="use /api/chat or /v1/chat/completions (the chat template counts in the input length)")
    p.add_argument("--concurrency", "-c", type=_ints, help="closed-loop levels, e.g. 1,4,16 (default 1)")
    p.add_argument("--request-rate", type=_floats, help="open-loop Poisson levels in requests/s, e.g. 1,2,inf")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight at a --request-rate level")
    p.add_argument("--num-prompts", "-n", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens of synthetic prompts (default 128)")
    p.add_argument("--output-len", type=int, help="output tokens per request (default 128; a dataset's "
                                                  "replies when --dataset is given)")
    p.add_argument("--dataset", help="ShareGPT-style JSON file of conversations, instead of synthetic prompts")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="ask the server to generate past EOS so lengths are exact (default: on; vLLM, llama.cpp and "
                        "finback honour it, Ollama ignores an option it does not know)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", help="bearer token (default FINBACK_API_KEY, then OPENAI_API_KEY)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    p.add_argument("--warmup", type=int, default=1, help="requests sent before the first level (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of latency against throughput")
    g = p.add_argument_group("finding the limit")
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT bound")
    g.add_argument("--slo-tpot-ms", type=float, help="TPOT bound")
    g.add_argument("--slo-percentile", type=int, choices=PERCENTILES, default=90, help="percentile the SLOs "
                                                                                          "bound (default 90)")
    g.add_argument("--max-search-concurrency", type=int, default=256, help="where the search stops (default 256)")
    p.set_defaults(func=cmd_bench)


def _base_url(url: str | None) -> str:
    if not url:
        from finback.cli.client import base_url
        return base_url()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def _discover(client, url: str, ns) -> tuple[str, str]:
    import httpx

    api = ns.api
    if api is None:
        try:
            r = await client.get(url + "/api/version")
            api = "ollama" if r.status_code == 200 and "version" in r.json() else "openai"
        except (httpx.HTTPError, ValueError):
            api = "openai"
    model = ns.model
    if model is None:
        path = "/api/tags" if api == "ollama" else "/v1/models"
        try:
            r = await client.get(url + path)
            r.raise_for_status()
            data = r.json()
            names = [m.get("name") or m.get("model") for m in data.get("models", [])] if api == "ollama" else \
                [m.get("id") for m in data.get("data", [])]
        except (httpx.HTTPError, ValueError) as exc:
            raise ValueError(f"could not list models at {url}{path} ({exc}); pass --model") from None
        if not names:
            raise ValueError(f"{url}{path} lists no model; pass --model")
        model = names[0]
    return api, model


def _check(ns) -> None:
    if ns.concurrency and ns.request_rate:
        raise ValueError("give --concurrency or --request-rate, not both")
    if ns.request_rate and any(r <= 0 for r in ns.request_rate):
        raise ValueError("--request-rate values must be positive (inf: all at once)")
    if ns.request_rate and (ns.slo_ttft_ms or ns.slo_tpot_ms):
        raise ValueError("the SLO search varies concurrency: drop --request-rate")
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency", "max_search_concurrency"):
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if ns.timeout <= 0 or ns.warmup < 0:
        raise ValueError("--timeout must be positive and --warmup not negative")
    if ns.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'finback[bench]'") from None


async def _bench(ns, console) -> dict[str, Any]:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from finback.cli.bench_client import Target, calibrate, dataset_prompts, send, synthetic_prompts

    url = _base_url(ns.url)
    key = ns.api_key or os.environ.get("FINBACK_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx.Timeout(ns.timeout, connect=30.0)
    # a connection per request: a kept-alive one that the server closes (llama-server does after a few
    # requests) would fail the next request before the server saw it, a client artefact, not a failure
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    rng = random.Random(ns.seed)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        api, model = await _discover(client, url, ns)
        ignore_eos = ns.ignore_eos if ns.ignore_eos is not None else True  # Ollama ignores options it lacks; finback and vLLM honour it
        target = Target(url, api, model, chat=ns.chat, ignore_eos=ignore_eos, temperature=ns.temperature)
        cal = await calibrate(client, target, ns.input_len, rng)
        for _ in range(ns.warmup):
            res = await send(client, target, *synthetic_prompts(1, ns.input_len, 8, cal, rng)[0])
            if not res.ok:
                raise ValueError(f"warm-up request failed: {res.error}")

        def prompts_for(n: int):
            if ns.dataset:
                return dataset_prompts(ns.dataset, n, ns.output_len, cal, rng)
            return synthetic_prompts(n, ns.input_len, ns.output_len or 128, cal, rng)

        entries: list[dict] = []
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)

        async def measure(level: Level) -> dict:
            n = max(ns.num_prompts, level.concurrency or 1)
            task = progress.add_task(level.label, total=n)
            results, duration = await run_level(client, target, prompts_for(n), level, rng,
                                                lambda r: progress.advance(task))
            entry = summarize(level, results, duration)
            entries.append(entry)
            return entry

        slo = None
        with progress:
            if ns.request_rate:
                for rate in ns.request_rate:
                    await measure(Level(rate=rate, max_concurrency=ns.max_concurrency))
            elif ns.slo_ttft_ms is None and ns.slo_tpot_ms is None:
                for c in ns.concurrency or [1]:
                    await measure(Level(concurrency=c))
            else:
                slo = await _search(ns, measure)
        if not ns.request_rate:
            entries.sort(key=lambda e: e["concurrency"])
        return {"url": url, "api": api, "endpoint": target.endpoint, "model": model, "ignore_eos": ignore_eos,
                "temperature": ns.temperature, "num_prompts": ns.num_prompts,
                "input_len": None if ns.dataset else ns.input_len, "output_len": ns.output_len or
                (None if ns.dataset else 128), "dataset": ns.dataset,
                "prompt_calibration": {"source": cal.source, "tokens_per_word": cal.slope, "overhead": cal.offset},
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "levels": entries, "slo": slo}


async def _search(ns, measure) -> dict:
    """The highest concurrency whose level holds the SLOs: among --concurrency if given, else doubling
    from 1 until one fails (or the cap), then bisecting between the last that held and the first that failed."""
    tried: dict[int, bool] = {}

    async def ok(c: int) -> bool:
        if c not in tried:
            tried[c] = holds(await measure(Level(concurrency=c)), ns)
        return tried[c]

    if ns.concurrency:
        for c in sorted(ns.concurrency):
            await ok(c)
        good = [c for c, h in tried.items() if h]
    else:
        good_c, bad_c, c = None, None, 1
        while c <= ns.max_search_concurrency:
            if await ok(c):
                good_c, c = c, c * 2
            else:
                bad_c = c
                break
        if good_c is not None and bad_c is not None:
            while bad_c - good_c > 1:
                mid = (good_c + bad_c) // 2
                if await ok(mid):
                    good_c = mid
                else:
                    bad_c = mid
        good = [good_c] if good_c is not None else []
    return {"ttft_ms": ns.slo_ttft_ms, "tpot_ms": ns.slo_tpot_ms, "percentile": ns.slo_percentile,
            "tried": {str(c): h for c, h in sorted(tried.items())}, "max_concurrency": max(good) if good else None}


def cmd_bench(ns) -> int:
    from rich.console import Console

    _check(ns)
    console = Console(stderr=True)
    out = Console()
    report = asyncio.run(_bench(ns, console))
    header = (f"{report['model']} at {report['url']}{report['endpoint']}, input {report['input_len'] or 'dataset'}, "
              f"output {report['output_len'] or 'dataset'}" + (" (ignore_eos)" if report["ignore_eos"] else ""))
    print_tables(out, report["levels"], header)
    if report["prompt_calibration"]["source"] == "words":
        out.print("note: the server reported no prompt token counts; one word was taken as one token")
    slo = report["slo"]
    if slo is not None:
        bounds = " and ".join(f"{name} p{slo['percentile']} <= {slo[k]:g} ms"
                              for name, k in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")) if slo[k] is not None)
        if slo["max_concurrency"] is None:
            out.print(f"[bold]No concurrency tried holds {bounds}.[/bold]")
        else:
            best = next(e for e in report["levels"] if e["concurrency"] == slo["max_concurrency"])
            out.print(f"[bold]Highest concurrency holding {bounds}: {slo['max_concurrency']} "
                      f"({best['output_throughput']:,.1f} output tok/s).[/bold]")
    if ns.json_path:
        with open(ns.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        out.print(f"wrote {ns.json_path}")
    if ns.plot:
        write_plot(ns.plot, report["levels"], header)
        out.print(f"wrote {ns.plot}")
    failed = sum(e["failed"] for e in report["levels"])
    return 1 if failed and failed == sum(e["num_requests"] for e in report["levels"]) else 0
