"""The asyncio front of the engine, for the server.

`LLMEngine` is synchronous and not thread-safe; `AsyncEngine` runs its step loop in one
background thread that alone touches it. Coroutines hand requests and aborts to that thread
through a queue, and each request gets its outputs back on its own asyncio queue. A request's
generator that is closed early (client went away) aborts the request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from finback.engine.arg_utils import EngineArgs
from finback.engine.llm_engine import LLMEngine
from finback.engine.request import RequestOutput
from finback.engine.sampling import SamplingParams

log = logging.getLogger("finback.engine")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="finback-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncEngine":
        return cls(LLMEngine(args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return not self._stopped and self.error is None and self._thread.is_alive()

    # -- the coroutine side ----------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each time the request makes progress; the last one is finished.
        Invalid requests raise (ValueError) before anything is yielded."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, q)
        self._commands.put(("add", request_id, prompt_token_ids, params or SamplingParams(), prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def embed(self, prompt_token_ids: list[int], normalize: bool = True) -> list[float]:
        """Run LLMEngine.embed in the engine thread, between steps."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        fut = asyncio.get_running_loop().create_future()
        self._commands.put(("embed", fut, prompt_token_ids, normalize))
        self._wake.set()
        return await fut

    def abort_all(self) -> None:
        """End every unfinished request (each stream gets its final output); thread-safe."""
        self._commands.put(("abort_all",))
        self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread -----------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the client's loop is closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, prompt = cmd
                try:
                    self.engine.add_request(rid, ids, params, prompt=prompt)
                except Exception as exc:  # bad request: tell that client only
                    self._deliver(rid, exc)
            elif cmd[0] == "embed":
                _, fut, ids, normalize = cmd
                loop = fut.get_loop()
                try:
                    result = self.engine.embed(ids, normalize)
                    loop.call_soon_threadsafe(lambda f=fut, r=result: f.done() or f.set_result(r))
                except Exception as exc:
                    loop.call_soon_threadsafe(lambda f=fut, e=exc: f.done() or f.set_exception(e))
            elif cmd[0] == "abort_all":
                for rid in list(self.engine.requests):
                    out = self.engine.abort_request(rid)
                    if out is not None:
                        self._deliver(rid, out)
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                if out is not None:
                    self._deliver(cmd[1], out)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the engine broke: fail every waiting request, loudly
            log.exception("engine step failed")
            self.error = exc
            err = EngineDeadError(f"the engine failed: {exc!r}")
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, err)
