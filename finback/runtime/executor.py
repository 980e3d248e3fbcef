"""Executors: how the engine runs its model, in its own process or over worker processes.

The engine asks an `Executor` for one step at a time (`execute(batch, block_tables, eos)` -> the
batch rows that produced a token and the sampler's output for them) and never sees ranks:

- `UniprocExecutor`: a `ModelRunner` in the engine's process (one device; today's path, no overhead).
- `MultiprocExecutor`: tensor_parallel_size x pipeline_parallel_size worker processes on this
  machine (`python -m finback.runtime.worker`), one per device, NCCL between GPUs, gloo on CPU.
- `RayExecutor` (finback/runtime/ray_executor.py): the same workers as Ray actors on a Ray cluster.

The distributed executors speak to their workers over the authenticated JSON channel of
finback/runtime/distributed.py (see finback/runtime/worker.py for what each step carries and where
sampling happens). A worker that dies, or reports an error, fails the step with `WorkerDied`: the
engine stops (its requests fail with that error, /health reports it) and every other worker is
stopped, so nothing waits on a collective that can never finish.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import time
import weakref

import torch

from finback.engine.sampling import SamplerOutput
from finback.engine.scheduler import ScheduledBatch
from finback.runtime.distributed import (
    AuthError,
    Channel,
    ChannelError,
    accept,
    decode_tensor,
    free_port,
    new_secret,
)

log = logging.getLogger("finback.executor")


class WorkerDied(RuntimeError):
    """A worker process exited or failed: the model cannot run any more."""


def kv_blocks_that_fit(per_block: int, device: torch.device, gpu_memory_utilization: float,
                       kv_cache_space_gb: float | None) -> int:
    """KV blocks of `per_block` bytes one process can hold: on CUDA what gpu_memory_utilization leaves
    after the weights (1 GiB kept for activations); on CPU kv_cache_space_gb (default 4)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - (total - free) - (1 << 30)
        return int(budget // per_block)
    space = (kv_cache_space_gb if kv_cache_space_gb is not None else 4.0) * (1 << 30)
    return int(space // per_block)


class Executor:
    """What the engine needs from whatever runs the model."""

    device: torch.device            # where the model runs (the workers' device type when distributed)
    dtype: torch.dtype
    load_duration_ns: int = 0
    token_bytes: list[bytes]        # the vocabulary's bytes, set by the engine for JSON mode
    generator_device = torch.device("cpu")  # where the engine keeps seeded requests' generators

    def kv_blocks_that_fit(self, block_size: int, gpu_memory_utilization: float,
                           kv_cache_space_gb: float | None) -> int:
        raise NotImplementedError

    def set_max_position(self, max_position: int) -> None:
        raise NotImplementedError

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_model_len: int | None = None) -> None:
        raise NotImplementedError

    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]], eos_token_ids: frozenset[int]
                ) -> tuple[list[int], SamplerOutput]:
        raise NotImplementedError

    def hidden_states(self, token_ids: list[int], block_table: list[int]) -> torch.Tensor:
        """Final hidden states [T, H] of one prompt through the given cache blocks (embeddings)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class UniprocExecutor(Executor):
    """The model in the engine's own process: a ModelRunner."""

    def __init__(self, args, checkpoint, device: torch.device, dtype: torch.dtype):
        from finback.runtime.model_runner import ModelRunner

        self.runner = ModelRunner(checkpoint, device, dtype, seed=args.seed, keep_int4=args.keep_int4,
                                  enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs)
        self.device, self.dtype = device, dtype
        self.generator_device = device
        self.load_duration_ns = self.runner.load_duration_ns
        self.execute = self.runner.execute
        self.hidden_states = self.runner.hidden_states
        self.allocate_kv_cache = self.runner.allocate_kv_cache

    @property
    def token_bytes(self) -> list[bytes]:
        return self.runner.token_bytes

    @token_bytes.setter
    def token_bytes(self, table: list[bytes]) -> None:
        self.runner.token_bytes = table

    def kv_blocks_that_fit(self, block_size, gpu_memory_utilization, kv_cache_space_gb) -> int:
        from finback.runtime.model_runner import kv_bytes_per_token

        per_block = kv_bytes_per_token(self.runner.model, self.dtype) * block_size
        return kv_blocks_that_fit(per_block, self.device, gpu_memory_utilization, kv_cache_space_gb)

    def set_max_position(self, max_position: int) -> None:
        self.runner.model.model.rotary.max_position = max_position


class DistributedExecutor(Executor):
    """The engine's side of tp x pp workers: launch them (subclasses say how), authenticate each
    one's connection, then broadcast every call and wait for every worker's answer."""

    listen_host = "127.0.0.1"

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.tp, self.pp = args.tensor_parallel_size, args.pipeline_parallel_size
        self.world = self.tp * self.pp
        self.device, self.dtype = device, dtype
        self.token_bytes: list[bytes] = []  # set by the engine for JSON mode; sent to the workers once
        self._token_bytes_sent = False
        self.error: BaseException | None = None
        self._live: dict[int, object] = {}   # seq_id -> Sequence the workers mirror
        self._reporter = (self.pp - 1) * self.tp  # tensor rank 0 of the last stage
        self.channels: dict[int, Channel] = {}
        self._selector: selectors.BaseSelector | None = None  # every channel, once all workers are ready
        self._secret = new_secret()
        self._server = socket.create_server((self.listen_host, 0))
        t0 = time.perf_counter_ns()
        common = {"model": args.model, "load_format": args.load_format, "dtype": str(dtype).removeprefix("torch."),
                  "device_type": device.type, "seed": args.seed, "keep_int4": args.keep_int4,
                  "enforce_eager": args.enforce_eager, "max_num_seqs": args.max_num_seqs, "tp": self.tp, "pp": self.pp,
                  "backend": "nccl" if device.type == "cuda" else "gloo",
                  "driver_host": self.listen_host, "driver_port": self._server.getsockname()[1]}
        try:
            self._launch(common)
            self._accept_all()
            self._wait(set(self.channels), "ready")
        except BaseException as exc:
            self._kill()
            if isinstance(exc, WorkerDied):
                raise WorkerDied(f"the workers did not start: {exc}") from None
            raise
        finally:
            self._server.close()
        self.load_duration_ns = time.perf_counter_ns() - t0
        self._selector = selectors.DefaultSelector()
        for rank, ch in self.channels.items():
            self._selector.register(ch.sock, selectors.EVENT_READ, rank)

    # -- subclass hooks --------------------------------------------------------------------
    def _launch(self, common: dict) -> None:
        raise NotImplementedError

    def _exit_status(self, rank: int) -> str | None:
        """Why worker `rank` is gone, or None while it runs."""
        raise NotImplementedError

    def _kill(self) -> None:
        raise NotImplementedError

    def _where(self, rank: int) -> str:
        stage, tp_rank = divmod(rank, self.tp)
        return f"worker {rank} (tensor rank {tp_rank} of {self.tp}, pipeline stage {stage} of {self.pp})"

    def _dead(self) -> WorkerDied | None:
        for rank in range(self.world):
            status = self._exit_status(rank)
            if status is not None:
                return WorkerDied(f"{self._where(rank)} {status}")
        return None

    # -- connections -----------------------------------------------------------------------
    def _accept_all(self) -> None:
        self._server.settimeout(0.5)
        while len(self.channels) < self.world:
            try:
                ch = accept(self._server, self._secret)
            except TimeoutError:
                dead = self._dead()
                if dead is not None:
                    raise dead
                continue
            ch.sock.settimeout(30)
            try:
                hello = ch.recv()
                rank = hello["hello"] if isinstance(hello, dict) else None
                if not isinstance(rank, int) or not 0 <= rank < self.world or rank in self.channels:
                    raise AuthError(f"bad hello {hello!r}")
            except (ChannelError, TimeoutError, KeyError) as exc:
                log.warning("refused a worker connection: %s", exc)
                ch.close()
                continue
            ch.sock.settimeout(None)
            self.channels[rank] = ch

    def _wait(self, ranks: set[int], key: str | None = None) -> dict[int, dict]:
        """Every listed worker's next answer; a worker that is gone or reports an error fails it."""
        sel = self._selector
        if sel is None:
            sel = selectors.DefaultSelector()
            for rank in ranks:
                sel.register(self.channels[rank].sock, selectors.EVENT_READ, rank)
        replies: dict[int, dict] = {}
        while len(replies) < len(ranks):
            events = sel.select(timeout=0.5)
            for sk, _ in events:
                rank = sk.data
                if rank in replies:
                    continue
                try:
                    reply = self.channels[rank].recv()
                except ChannelError as exc:
                    time.sleep(0.2)  # let the exit status arrive
                    raise WorkerDied(f"{self._where(rank)} {self._exit_status(rank) or 'is gone'} ({exc})") from None
                if "error" in reply:
                    raise WorkerDied(reply["error"])
                if key is not None and key not in reply:
                    raise WorkerDied(f"{self._where(rank)} answered {sorted(reply)} instead of {key!r}")
                replies[rank] = reply
            if not events:
                dead = self._dead()
                if dead is not None:
                    raise dead
        if sel is not self._selector:
            sel.close()
        return replies

    def _call(self, msg: dict) -> dict[int, dict]:
        if self.error is not None:
            raise WorkerDied(f"the workers are stopped: {self.error}")
        try:
            for ch in self.channels.values():
                ch.send(msg)
            return self._wait(set(self.channels))
        except (WorkerDied, ChannelError) as exc:
            self.error = exc
            self._kill()
            raise WorkerDied(str(exc)) from None

    # -- the Executor interface ------------------------------------------------------------
    def kv_blocks_that_fit(self, block_size, gpu_memory_utilization, kv_cache_space_gb) -> int:
        replies = self._call({"op": "info", "block_size": block_size, "gpu_memory_utilization": gpu_memory_utilization,
                              "kv_cache_space_gb": kv_cache_space_gb})
        return min(r["blocks"] for r in replies.values())

    def set_max_position(self, max_position: int) -> None:
        self._call({"op": "set_max_position", "max_position": max_position})

    def allocate_kv_cache(self, num_blocks: int, block_size: int, max_model_len: int | None = None) -> None:
        self._call({"op": "allocate", "num_blocks": num_blocks, "block_size": block_size,
                    "max_model_len": max_model_len})

    def execute(self, batch, block_tables, eos_token_ids):
        import dataclasses

        free = [sid for sid, seq in self._live.items() if seq.finished]
        for sid in free:
            del self._live[sid]
        seqs = []
        for seq, n, table in zip(batch.seqs, batch.num_tokens, block_tables):
            start = seq.num_computed_tokens
            entry = {"id": seq.seq_id, "start": start, "ids": seq.token_ids[start:start + n], "len": seq.num_tokens,
                     "table": table}
            if seq.seq_id not in self._live:
                p = seq.params
                entry["new"] = {"prompt_len": seq.prompt_len, "params": dataclasses.asdict(p),
                                "prefix": seq.token_ids[:start],
                                "seed": None if p.seed is None else p.seed + seq.index}
                self._live[seq.seq_id] = seq
            seqs.append(entry)
        msg = {"op": "step", "seqs": seqs, "free": free, "eos": sorted(eos_token_ids)}
        if self.token_bytes and not self._token_bytes_sent:
            msg["token_bytes"] = [base64.b64encode(t).decode() for t in self.token_bytes]
            self._token_bytes_sent = True
        out = self._call(msg)[self._reporter]
        logprobs = [None if lp is None else (lp[0], [tuple(p) for p in lp[1]]) for lp in out["logprobs"]]
        return out["rows"], SamplerOutput(token_ids=out["tokens"], logprobs=logprobs)

    def hidden_states(self, token_ids, block_table):
        out = self._call({"op": "hidden", "ids": list(token_ids), "table": list(block_table)})[self._reporter]
        return decode_tensor(out["hidden"])

    def shutdown(self) -> None:
        if self.error is None:
            for ch in self.channels.values():
                try:
                    ch.send({"op": "shutdown"})
                except ChannelError:
                    pass
            self.error = RuntimeError("shut down")
        self._kill()
        for ch in self.channels.values():
            ch.close()


class MultiprocExecutor(DistributedExecutor):
    """tp x pp worker processes on this machine, rank r on cuda:r (or the CPU)."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.procs: list[subprocess.Popen] = []
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if device.type == "cuda" and world > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} needs {world} GPUs; "
                             f"this machine has {torch.cuda.device_count()}")
        super().__init__(args, device, dtype)

    def _launch(self, common: dict) -> None:
        weakref.finalize(self, _terminate, self.procs)  # an engine dropped without shutdown()
        common = dict(common, init_method=f"tcp://127.0.0.1:{free_port()}",
                      threads=max(1, (os.cpu_count() or 1) // self.world))
        env = dict(os.environ)
        if self.device.type == "cpu":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are on this machine
        for rank in range(self.world):
            cfg = dict(common, rank=rank, local_rank=rank, secret=self._secret.hex())
            proc = subprocess.Popen([sys.executable, "-m", "finback.runtime.worker"], stdin=subprocess.PIPE, env=env)
            self.procs.append(proc)
            proc.stdin.write(json.dumps(cfg).encode() + b"\n")
            proc.stdin.close()

    def _exit_status(self, rank: int) -> str | None:
        code = self.procs[rank].poll() if rank < len(self.procs) else None
        return None if code is None else f"exited with code {code}"

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _terminate(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def make_executor(args, checkpoint, device: torch.device, dtype: torch.dtype) -> Executor:
    """The executor EngineArgs ask for: one process unless tensor/pipeline parallelism (or Ray) is on."""
    backend = args.distributed_executor_backend
    if backend not in (None, "mp", "ray"):
        raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', got {backend!r}")
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    if backend is None and world == 1:
        return UniprocExecutor(args, checkpoint, device, dtype)
    if args.pipeline_parallel_size > 1:
        from finback.models.registry import model_class

        if not getattr(model_class(checkpoint.config.architecture), "supports_pp", False):
            raise ValueError(f"{checkpoint.config.architecture} models do not support pipeline parallelism yet")
        if args.pipeline_parallel_size > checkpoint.config.num_hidden_layers:
            raise ValueError(f"pipeline_parallel_size {args.pipeline_parallel_size} is more than the model's "
                             f"{checkpoint.config.num_hidden_layers} layers")
    heads = getattr(checkpoint.config, "num_attention_heads", None)
    if heads and heads % args.tensor_parallel_size:
        raise ValueError(f"the model's {heads} attention heads cannot be split evenly over "
                         f"tensor_parallel_size {args.tensor_parallel_size}")
    if backend == "ray":
        from finback.runtime.ray_executor import RayExecutor

        return RayExecutor(args, device, dtype)
    return MultiprocExecutor(args, device, dtype)
