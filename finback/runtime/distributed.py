"""Multi-process plumbing: the control channel between the engine and its workers, and the
torch.distributed groups the workers compute with.

The control channel carries JSON, never pickles. A message on the wire is
`[4-byte big-endian length][32-byte HMAC-SHA256 tag][JSON payload]`. The HMAC key of a connection is
HMAC(secret, nonce): `secret` is drawn fresh for every launch and handed to the workers out of band
(a subprocess's stdin, a Ray actor call), `nonce` is sent by the engine when the worker connects, so
a message recorded on one connection is refused on any other. Every message carries its number in
the signed payload and the direction is part of what is signed: a replayed, reordered or reflected
message is refused as well as a forged one. Tags are compared in constant time. Tensors travel
between workers through torch.distributed; the only array that ever crosses this channel is an
embedding's hidden states (raw float32 bytes, base64, read back with numpy.frombuffer).

Ranks: global rank = pipeline stage * TP + tensor rank. Each stage's TP ranks form one
`ParallelGroup`; stages pass (hidden, residual) to the same tensor rank of the next stage.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import struct
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from finback.runtime.parallel import ParallelGroup, PipelineStage

MAX_MESSAGE = 1 << 30   # bytes of one JSON payload
NONCE_BYTES = 16
_HEADER = struct.Struct(">I")
_TAG = 32


class ChannelError(ConnectionError):
    """The peer went away or broke the framing."""


class AuthError(ChannelError):
    """A message whose HMAC, number or direction is wrong: refused, and the connection with it."""


def new_secret() -> bytes:
    return os.urandom(32)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except OSError as exc:
            raise ChannelError(f"the peer is gone: {exc}") from None
        if not chunk:
            raise ChannelError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


class Channel:
    """One authenticated JSON connection. `outgoing`/`incoming` name the two directions (the engine
    sends "engine->worker" and reads "worker->engine", a worker the reverse)."""

    def __init__(self, sock: socket.socket, secret: bytes, nonce: bytes, outgoing: str, incoming: str):
        self.sock = sock
        self._key = hmac.new(secret, nonce, hashlib.sha256).digest()
        self._out, self._in = outgoing.encode(), incoming.encode()
        self._sent = 0
        self._received = 0

    def _tag(self, direction: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, direction + b"\0" + payload, hashlib.sha256).digest()

    def send(self, obj: Any) -> None:
        payload = json.dumps({"n": self._sent, "m": obj}, separators=(",", ":")).encode()
        if len(payload) > MAX_MESSAGE:
            raise ValueError(f"control message of {len(payload)} bytes is over the {MAX_MESSAGE} limit")
        self._sent += 1
        try:
            self.sock.sendall(_HEADER.pack(len(payload)) + self._tag(self._out, payload) + payload)
        except OSError as exc:
            raise ChannelError(f"the peer is gone: {exc}") from None

    def recv(self) -> Any:
        head = _read_exact(self.sock, _HEADER.size + _TAG)
        (length,) = _HEADER.unpack_from(head)
        if length > MAX_MESSAGE:
            raise AuthError(f"control message of {length} bytes announced: over the limit, refused")
        payload = _read_exact(self.sock, length)
        if not hmac.compare_digest(head[_HEADER.size:], self._tag(self._in, payload)):
            raise AuthError("control message with a bad HMAC: refused")
        msg = json.loads(payload)
        if msg.get("n") != self._received:
            raise AuthError(f"control message number {msg.get('n')} where {self._received} was due: refused")
        self._received += 1
        return msg["m"]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


ENGINE_TO_WORKER, WORKER_TO_ENGINE = "engine->worker", "worker->engine"


def connect(host: str, port: int, secret: bytes, timeout: float = 60.0) -> Channel:
    """A worker's side: connect, read the engine's nonce, return the channel."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce = _read_exact(sock, NONCE_BYTES)
    sock.settimeout(None)
    return Channel(sock, secret, nonce, WORKER_TO_ENGINE, ENGINE_TO_WORKER)


def accept(server: socket.socket, secret: bytes) -> Channel:
    """The engine's side of one new connection: send a fresh nonce, return the channel."""
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce = os.urandom(NONCE_BYTES)
    sock.sendall(nonce)
    return Channel(sock, secret, nonce, ENGINE_TO_WORKER, WORKER_TO_ENGINE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def encode_tensor(t: torch.Tensor) -> dict:
    a = t.detach().float().cpu().contiguous().numpy()
    return {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def decode_tensor(d: dict) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32)
    return torch.from_numpy(a.copy()).view(*d["shape"])


def init_distributed(rank: int, tp: int, pp: int, init_method: str, backend: str,
                     timeout_s: float = 600.0) -> tuple[ParallelGroup, PipelineStage]:
    """Join the process group and build this rank's tensor-parallel group and pipeline stage.
    Every rank creates every stage's group, in the same order (torch.distributed requires it)."""
    import torch.distributed as dist

    world = tp * pp
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    stage_rank, tp_rank = divmod(rank, tp)
    process_group = None
    if tp > 1 and pp == 1:
        process_group = dist.group.WORLD
    elif tp > 1:
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
        process_group = groups[stage_rank]
    return ParallelGroup(tp_rank, tp, process_group), PipelineStage(stage_rank, pp)
