"""The HTTP app: Ollama's routes, OpenAI's routes, CORS, errors, liveness."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from finback.server import auth, limits, metrics
from finback.server.manager import ModelManager
from finback.server.ollama import APIError, build_router
from finback.server.options import parse_duration
from finback.store.store import Store

log = logging.getLogger("finback.server")

from finback.server import hosts
from finback.server.hosts import DEFAULT_HOST, DEFAULT_PORT, env  # noqa: F401
# Ollama's default allow-list: local origins and app schemes
DEFAULT_ORIGINS = ["http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                   "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                   "http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
                   "app://*", "file://*", "tauri://*", "vscode-webview://*"]


def parse_host(value: str | None) -> tuple[str, int]:
    """(host, port) to listen on, from FINBACK_HOST / OLLAMA_HOST."""
    _, host, port = hosts.parse_host(value)
    return host, port


def _origin_regex(origins: list[str]) -> str:
    import re

    parts = [re.escape(o).replace(r"\*", "[^/]*") for o in origins]
    return "^(" + "|".join(parts) + ")$"


def create_app(store: Store | None = None, engine_kwargs: dict | None = None,
               keep_alive: str | float | None = None, origins: list[str] | None = None,
               api_keys: list[str] | str | None = None, max_concurrent_requests: int | None = None,
               max_body_bytes: int | None = None) -> FastAPI:
    """api_keys: None -> FINBACK_API_KEY (comma-separated; unset = no auth), [] -> no auth.
    max_concurrent_requests: generation requests in flight (FINBACK_MAX_CONCURRENT_REQUESTS, 256).
    max_body_bytes: JSON request bodies (FINBACK_MAX_REQUEST_BODY, 16 MiB; blob uploads unlimited)."""
    store = store or Store()
    ka = parse_duration(keep_alive if keep_alive is not None else env("KEEP_ALIVE", "5m"))
    manager = ModelManager(store, engine_kwargs, default_keep_alive=ka)
    app = FastAPI(title="finback", docs_url=None, redoc_url=None)
    app.state.manager = manager
    keys = auth.keys_from_env() if api_keys is None else auth.parse_keys(api_keys)
    app.state.api_key_count = len(keys)  # the keys themselves stay inside the middleware
    app.state.limiter = limits.Limiter(max_body_bytes, max_concurrent_requests)
    app.state.metrics = metrics.Metrics()
    # outermost last: CORS (answers preflights, decorates refusals) > metrics (counts refusals too)
    # > API keys > body/concurrency limits > API-shaped 500s > routes
    app.add_middleware(limits.ErrorMiddleware)
    app.add_middleware(limits.LimitsMiddleware, limiter=app.state.limiter)
    app.add_middleware(auth.APIKeyMiddleware, keys=keys)
    app.add_middleware(metrics.MetricsMiddleware, metrics=app.state.metrics, router=app.router)
    extra = [o.strip() for o in (env("ORIGINS") or "").split(",") if o.strip()]
    allowed = (origins if origins is not None else []) + extra + DEFAULT_ORIGINS
    app.add_middleware(CORSMiddleware, allow_origin_regex=_origin_regex(allowed), allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    from finback.server.openai import OpenAIError, build_router as openai_router

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/")
    @app.head("/")
    async def root():
        return PlainTextResponse("Ollama is running")

    @app.get("/health")
    @app.head("/health")
    async def health():
        status, body = metrics.health(manager)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(app.state.metrics.render(manager, app.state.limiter),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(build_router(manager))
    app.include_router(openai_router(manager))

    @app.on_event("shutdown")
    async def shutdown():
        manager.shutdown()

    return app


def serve(host: str | None = None, port: int | None = None, **kwargs) -> None:
    import contextlib
    import signal
    import threading

    import uvicorn

    h, p = parse_host(env("HOST"))
    app = create_app(**kwargs)
    bind = host or h
    if app.state.api_key_count:
        log.info("API keys required (%d configured)", app.state.api_key_count)
    elif bind not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it "
                    "(set FINBACK_API_KEY)", bind)
    log.info("finback listening on %s:%d", host or h, port or p)
    manager = app.state.manager

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # like uvicorn's, without re-raising the signal after the shutdown: a SIGTERM that
            # was handled gracefully ends the process with status 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            # graceful shutdown: uvicorn stops accepting and waits for open connections; we end
            # every in-flight generation now, so each stream gets its final chunk and closes
            if not self.should_exit:
                log.info("shutting down: finishing in-flight requests")
                manager.abort_all()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host or h, port=port or p, log_level="info")).run()
