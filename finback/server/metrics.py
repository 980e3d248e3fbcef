"""`/metrics` (Prometheus text format 0.0.4, written by hand) and `/health`.

What is measured, and where it comes from:

- HTTP, by a plain ASGI middleware around the whole app (so 401/413/503 refusals count too):
  `finback_http_requests_total{method,route,status}` and
  `finback_http_request_duration_seconds{method,route}` (a histogram; for a streamed response the
  time until its last byte). `route` is the route's template (`/api/blobs/{digest}`), never the raw
  path, so the label set stays bounded; paths no route matches are `route="other"`.
- Streamed generation: `finback_time_to_first_chunk_seconds{route}`: from the request's arrival to
  the first body chunk of a streamed generation response, i.e. time to first token as the client
  sees it (model load and queueing included).
- Tokens: `finback_prompt_tokens_total{model}` and `finback_generation_tokens_total{model}`, read from
  the responses as they pass: Ollama's final object (`prompt_eval_count`, `eval_count`, streamed or
  not) and OpenAI's `usage` (non-streamed, or streamed with `stream_options.include_usage`). Only
  chunks that contain those keys are parsed. An OpenAI stream without include_usage is not counted
  by this path; route handlers may instead call `record_generation(request, model, output)` with the
  last RequestOutput, which counts tokens exactly, adds the engine's time to first token and turns
  the sniffing off for that request.
- Engine state, read when scraped, per loaded model: `finback_engine_running`, `finback_engine_waiting`
  (scheduler queues), `finback_engine_requests` (unfinished requests), `finback_kv_cache_usage_ratio`,
  `finback_prefix_cache_queries_total` / `_hits_total` / `finback_prefix_cache_hit_ratio`,
  `finback_engine_up` (0 once the engine thread died); `finback_models_loaded`;
  `finback_generation_requests_in_flight` and `finback_generation_requests_rejected_total` from the
  concurrency limit.
Engine counters restart from 0 when a model is reloaded (Prometheus' rate() handles resets).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from typing import Any


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GENERATION_PATHS = frozenset({"/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions"})
RECORDED = "finback.tokens_recorded"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {cum}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lb = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lb} {_num(self.sum)}")
        out.append(f"{name}_count{lb} {self.count}")
        return out


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw) -> str:
    return ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items())


class Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.first_chunk: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.itl: dict[str, Histogram] = {}
        self.e2e: dict[str, Histogram] = {}
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.generation_tokens: dict[str, int] = defaultdict(int)
        self.started = time.time()

    # -- recording --------------------------------------------------------------------------
    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        h = self.latency.get((method, route))
        if h is None:
            h = self.latency[(method, route)] = Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def observe_first_chunk(self, route: str, seconds: float) -> None:
        h = self.first_chunk.get(route)
        if h is None:
            h = self.first_chunk[route] = Histogram(TTFT_BUCKETS)
        h.observe(seconds)

    def count_tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens[model] += max(0, int(prompt))
        self.generation_tokens[model] += max(0, int(generated))

    def record_generation(self, request, model: str, out) -> None:
        """For route handlers: count a finished request from its last RequestOutput (exact, any API,
        streamed or not), with the engine's time to first token. Turns off response sniffing for
        this request so nothing is counted twice."""
        if request is not None:
            request.scope[RECORDED] = True
        self.count_tokens(model, len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))
        m = out.metrics
        if m.first_token_ns is not None and m.arrival_ns:
            h = self.ttft.get(model)
            if h is None:
                h = self.ttft[model] = Histogram(TTFT_BUCKETS)
            h.observe((m.first_token_ns - m.arrival_ns) / 1e9)
        for table, buckets, value in (
                (self.itl, ITL_BUCKETS, out.eval_duration / 1e9 / (out.eval_count - 1) if out.eval_count > 1 else None),
                (self.e2e, E2E_BUCKETS, (m.finished_ns - m.arrival_ns) / 1e9 if m.finished_ns else None)):
            if value is not None:
                h = table.get(model)
                if h is None:
                    h = table[model] = Histogram(buckets)
                h.observe(value)

    def sniff(self, chunk: bytes) -> None:
        """Count tokens from a generation response chunk (Ollama's final stats, OpenAI's usage)."""
        if b'"eval_count"' not in chunk and b'"usage"' not in chunk:
            return
        for line in chunk.splitlines():
            line = line.strip()
            if line.startswith(b"data:"):
                line = line[5:].strip()
            if not line.startswith(b"{") or (b'"eval_count"' not in line and b'"usage"' not in line):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            model = obj.get("model")
            if not isinstance(model, str):
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.count_tokens(model, usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
            elif "eval_count" in obj:
                self.count_tokens(model, obj.get("prompt_eval_count") or 0, obj.get("eval_count") or 0)

    # -- exposition -------------------------------------------------------------------------
    def render(self, manager=None, limits=None) -> str:
        out: list[str] = []

        def head(name, kind, help_):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        head("finback_http_requests_total", "counter", "HTTP requests by method, route template and status.")
        for (method, route, status), n in sorted(self.requests.items()):
            out.append(f"finback_http_requests_total{{{_labels(method=method, route=route, status=status)}}} {n}")
        head("finback_http_request_duration_seconds", "histogram",
             "HTTP request latency until the last byte of the response.")
        for (method, route), h in sorted(self.latency.items()):
            out += h.lines("finback_http_request_duration_seconds", _labels(method=method, route=route))
        head("finback_time_to_first_chunk_seconds", "histogram",
             "Streamed generation: time from arrival to the first response chunk (first token).")
        for route, h in sorted(self.first_chunk.items()):
            out += h.lines("finback_time_to_first_chunk_seconds", _labels(route=route))
        head("finback_time_to_first_token_seconds", "histogram",
             "Engine time from a request's arrival to its first token (handlers that record outputs).")
        for model, h in sorted(self.ttft.items()):
            out += h.lines("finback_time_to_first_token_seconds", _labels(model=model))
        head("finback_inter_token_latency_seconds", "histogram",
             "Mean time between output tokens of each finished request (handlers that record outputs).")
        for model, h in sorted(self.itl.items()):
            out += h.lines("finback_inter_token_latency_seconds", _labels(model=model))
        head("finback_e2e_request_latency_seconds", "histogram",
             "Engine time from a request's arrival to its last token (handlers that record outputs).")
        for model, h in sorted(self.e2e.items()):
            out += h.lines("finback_e2e_request_latency_seconds", _labels(model=model))
        head("finback_prompt_tokens_total", "counter", "Prompt tokens of finished generation requests.")
        for model, n in sorted(self.prompt_tokens.items()):
            out.append(f"finback_prompt_tokens_total{{{_labels(model=model)}}} {n}")
        head("finback_generation_tokens_total", "counter", "Tokens generated by finished generation requests.")
        for model, n in sorted(self.generation_tokens.items()):
            out.append(f"finback_generation_tokens_total{{{_labels(model=model)}}} {n}")

        if limits is not None:
            head("finback_generation_requests_in_flight", "gauge", "Generation requests now being served.")
            out.append(f"finback_generation_requests_in_flight {limits.in_flight}")
            head("finback_generation_requests_max", "gauge", "The bound on generation requests in flight.")
            out.append(f"finback_generation_requests_max {limits.max_concurrent_requests}")
            head("finback_generation_requests_rejected_total", "counter",
                 "Generation requests refused with 503 because too many were in flight.")
            out.append(f"finback_generation_requests_rejected_total {limits.rejected}")

        if manager is not None:
            models = list(manager.loaded.items())
            head("finback_models_loaded", "gauge", "Models loaded now.")
            out.append(f"finback_models_loaded {len(models)}")
            rows = [(name, engine_stats(m.engine)) for name, m in models]
            for metric, kind, help_ in ENGINE_METRICS:
                head(metric, kind, help_)
                for name, stats in rows:
                    if metric in stats:
                        out.append(f"{metric}{{{_labels(model=name)}}} {_num(stats[metric])}")
        head("finback_uptime_seconds", "gauge", "Seconds since the server started.")
        out.append(f"finback_uptime_seconds {_num(round(time.time() - self.started, 3))}")
        return "\n".join(out) + "\n"


ENGINE_METRICS = [
    ("finback_engine_up", "gauge", "1 while the model's engine thread runs, 0 once it stopped or failed."),
    ("finback_engine_running", "gauge", "Sequences the scheduler is running."),
    ("finback_engine_waiting", "gauge", "Sequences waiting to be scheduled."),
    ("finback_engine_requests", "gauge", "Unfinished requests in the engine."),
    ("finback_kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use."),
    ("finback_prefix_cache_queries_total", "counter", "Prefix cache lookups (full blocks)."),
    ("finback_prefix_cache_hits_total", "counter", "Prefix cache hits (full blocks)."),
    ("finback_prefix_cache_hit_ratio", "gauge", "Prefix cache hits / lookups since the model was loaded."),
]


def engine_stats(async_engine) -> dict[str, float]:
    """Gauges of one AsyncEngine, read from the server's thread: len() and plain attribute reads
    only (each atomic under the GIL), so a scrape never blocks or races the engine thread into an
    error."""
    stats: dict[str, float] = {"finback_engine_up": 1 if async_engine.is_running else 0}
    eng = getattr(async_engine, "engine", None)
    try:
        sched, bm = eng.scheduler, eng.block_manager
        stats["finback_engine_running"] = len(sched.running)
        stats["finback_engine_waiting"] = len(sched.waiting)
        stats["finback_engine_requests"] = len(eng.requests)
        stats["finback_kv_cache_usage_ratio"] = float(bm.usage())
        q, h = int(bm.queries), int(bm.hits)
        stats["finback_prefix_cache_queries_total"] = q
        stats["finback_prefix_cache_hits_total"] = h
        stats["finback_prefix_cache_hit_ratio"] = (h / q) if q else 0.0
    except (AttributeError, RuntimeError, ZeroDivisionError):  # an engine without these parts
        pass
    return stats


def health(manager) -> tuple[int, dict[str, Any]]:
    """200 {"status": "ok", ...} while every loaded model's engine runs; 503 naming each model
    whose engine stopped or failed, with its error."""
    models, failed = [], []
    for name, m in list(manager.loaded.items()):
        eng = m.engine
        row: dict[str, Any] = {"name": name, "running": bool(eng.is_running)}
        if not eng.is_running:
            row["error"] = repr(eng.error) if eng.error is not None else "the engine stopped"
            failed.append(row)
        models.append(row)
    body: dict[str, Any] = {"status": "ok" if not failed else "error", "models": models}
    if failed:
        body["error"] = "; ".join(f"model '{r['name']}': {r['error']}" for r in failed)
    return (503 if failed else 200), body


def _flatten(routes, depth: int = 0) -> list:
    out = []
    for r in routes:
        regex, path = getattr(r, "path_regex", None), getattr(r, "path", None)
        if regex is not None and isinstance(path, str):
            out.append((regex, path))
        inner = getattr(r, "original_router", None) or getattr(r, "routes", None)
        if inner is not None and depth < 4:
            out += _flatten(getattr(inner, "routes", inner) or [], depth + 1)
    return out


class MetricsMiddleware:
    """Counts every HTTP request by route template and status, times it to its last byte, and
    sniffs token counts from generation responses (see the module docstring)."""

    def __init__(self, app, metrics: Metrics, router):
        self.app = app
        self.metrics = metrics
        self.router = router
        self._templates = None  # [(path_regex, template)], built on the first request

    def route_of(self, scope) -> str:
        """The template of the first route whose path matches (methods aside), else "other"."""
        if self._templates is None:
            self._templates = _flatten(getattr(self.router, "routes", []))
        path = scope["path"]
        for regex, template in self._templates:
            if regex.match(path):
                return template
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = self.route_of(scope)
        generation = method == "POST" and scope["path"] in GENERATION_PATHS
        status = 500
        first = True
        streamed = False
        metrics = self.metrics

        async def wrapped(msg):
            nonlocal status, first, streamed
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if generation:
                    for k, v in msg.get("headers") or []:
                        if k == b"content-type" and (v.startswith(b"text/event-stream")
                                                    or v.startswith(b"application/x-ndjson")):
                            streamed = True
            elif msg["type"] == "http.response.body" and generation and status == 200:
                body = msg.get("body", b"")
                if body:
                    if first and streamed:
                        metrics.observe_first_chunk(route, time.perf_counter() - t0)
                    first = False
                    if not scope.get(RECORDED):
                        try:
                            metrics.sniff(body)
                        except Exception:  # metrics must never break a response
                            pass
            await send(msg)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            metrics.observe_request(method, route, status, time.perf_counter() - t0)
