"""Loaded models: one AsyncEngine per model, loaded on first use, unloaded after keep_alive.

Concurrent requests to one model share its engine (and so are batched together). Loading runs in
a worker thread so the server keeps answering; a per-model lock makes concurrent first requests
load once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from finback.engine.arg_utils import EngineArgs
from finback.engine.async_engine import AsyncEngine
from finback.store.names import ModelName, ModelNotFound
from finback.store.store import Store

log = logging.getLogger("finback.server")


@dataclass
class LoadedModel:
    name: str
    path: str
    engine: AsyncEngine
    template: Any            # finback.prompt.template.ChatTemplate | finback.prompt.gotemplate.GoTemplate | None
    template_kind: str       # "jinja" | "go" | "none"
    system: str
    params: dict[str, Any]
    messages: list[dict]
    details: dict[str, Any]
    digest: str
    size: int
    load_duration_ns: int
    expires_at: float = 0.0  # time.time(); inf = forever
    pending_load_report: bool = True
    active: int = 0
    context_length: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.engine.tokenizer


class ModelManager:
    def __init__(self, store: Store, engine_kwargs: dict[str, Any] | None = None,
                 default_keep_alive: float = 300.0):
        self.store = store
        self.engine_kwargs = dict(engine_kwargs or {})
        self.default_keep_alive = default_keep_alive
        self.loaded: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None

    # -- names -----------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound("model is required")
        if os.path.exists(name):
            return os.path.abspath(name)
        return ModelName.parse(name).display

    def _ensure_in_store(self, name: str) -> None:
        """The embedded default model is always available: it is installed into the store from
        its package on first use (a local copy, no download)."""
        if self.store.exists(name):
            return
        from finback.store.catalog import is_embedded

        if is_embedded(name):
            from finback.store.pull import pull

            pull(self.store, name)
            return
        raise ModelNotFound(f"model '{name}' not found")

    # -- loading ---------------------------------------------------------------------------
    async def get(self, name: str, keep_alive: float | None = None) -> LoadedModel:
        key = self.canonical(name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            model = self.loaded.get(key)
            if model is not None and not model.engine.is_running:  # a dead engine: replace it
                self.unload(key)
                model = None
            if model is None:
                model = await asyncio.to_thread(self._load, key)
                self.loaded[key] = model
        self.touch(model, keep_alive)
        self._start_reaper()
        return model

    def _load(self, key: str) -> LoadedModel:
        from finback.prompt.template import ChatTemplate

        t0 = time.perf_counter_ns()
        if os.path.exists(key):
            path, info = key, {"template": "", "system": "", "parameters": {}, "messages": [],
                               "details": {}, "digest": "", "size": os.path.getsize(key)}
        else:
            self._ensure_in_store(key)
            path = self.store.model_path(key)
            info = self.store.show(key)
            info["size"] = next((m.size for m in self.store.list() if m.name == key), 0)
        params = dict(info.get("parameters") or {})
        kwargs = dict(self.engine_kwargs)
        if "num_ctx" in params and "max_model_len" not in kwargs:
            kwargs["max_model_len"] = int(params["num_ctx"])
        from finback.hardware.fit import check_engine_fits

        check_engine_fits(path, kwargs)  # a model that cannot fit is refused here, with the planner's table
        engine = AsyncEngine.from_engine_args(EngineArgs.from_kwargs(path, **kwargs))
        tok = engine.tokenizer
        template, kind = None, "none"
        if info.get("template"):
            from finback.prompt.gotemplate import GoTemplate

            template, kind = GoTemplate(info["template"]), "go"
        elif tok is not None and tok.chat_template:
            template, kind = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token), "jinja"
        return LoadedModel(
            name=key, path=path, engine=engine, template=template, template_kind=kind,
            system=info.get("system") or "", params=params, messages=list(info.get("messages") or []),
            details=info.get("details") or {}, digest=info.get("digest") or "", size=int(info.get("size") or 0),
            load_duration_ns=time.perf_counter_ns() - t0, context_length=engine.engine.max_model_len)

    # -- keep_alive ------------------------------------------------------------------------
    def touch(self, model: LoadedModel, keep_alive: float | None) -> None:
        ka = self.default_keep_alive if keep_alive is None else keep_alive
        model.expires_at = float("inf") if ka < 0 else time.time() + ka

    def unload(self, key: str) -> bool:
        model = self.loaded.pop(key, None)
        if model is None:
            return False
        model.engine.shutdown()
        model.engine.engine.shutdown()  # its worker processes, when tensor/pipeline parallel
        return True

    def unload_name(self, name: str) -> bool:
        return self.unload(self.canonical(name))

    def reap(self) -> None:
        now = time.time()
        for key, model in list(self.loaded.items()):
            if model.active == 0 and model.expires_at <= now:
                log.info("unloading %s (keep_alive expired)", key)
                self.unload(key)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def _reap_loop(self) -> None:
        while self.loaded:
            self.reap()
            await asyncio.sleep(0.5)

    def abort_all(self) -> None:
        """End every in-flight request of every loaded model (thread-safe; used on SIGTERM)."""
        for model in list(self.loaded.values()):
            model.engine.abort_all()

    def shutdown(self) -> None:
        for key in list(self.loaded):
            self.unload(key)

    def ps(self) -> list[dict[str, Any]]:
        out = []
        for key, m in self.loaded.items():
            expires = (dt.datetime(2318, 1, 1, tzinfo=dt.timezone.utc) if m.expires_at == float("inf")
                       else dt.datetime.fromtimestamp(m.expires_at, dt.timezone.utc))
            vram = 0
            if m.engine.engine.device.type == "cuda":
                vram = m.size
            out.append({"name": key, "model": key, "size": m.size, "digest": m.digest,
                        "details": m.details, "expires_at": expires.astimezone().isoformat(),
                        "size_vram": vram, "context_length": m.context_length})
        return out
