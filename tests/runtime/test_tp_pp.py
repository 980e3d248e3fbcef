"""Tensor and pipeline parallelism over worker processes (gloo on CPU): greedy and seeded output,
logprobs and embeddings equal the single-process engine's; the control channel refuses forged,
replayed and reflected messages. (A worker that dies: test_worker_death.py.)"""

import os
import random
import socket

import pytest
from fbtest import save_safetensors, tiny_hf_model

from finback import LLM, SamplingParams
from finback.runtime.distributed import (
    ENGINE_TO_WORKER,
    WORKER_TO_ENGINE,
    AuthError,
    Channel,
    accept,
    connect,
    new_secret,
)
from finback.runtime.parallel import PipelineStage
from finback.runtime.worker import split_pieces

# -- the control channel ---------------------------------------------------------------------------


class _Wire:
    """A socket stand-in that records what a Channel sends (to replay or tamper with it)."""

    def __init__(self):
        self.frames = []

    def sendall(self, data):
        self.frames.append(bytes(data))


def _frames(secret, nonce, objs, outgoing=ENGINE_TO_WORKER, incoming=WORKER_TO_ENGINE):
    wire = _Wire()
    ch = Channel(wire, secret, nonce, outgoing, incoming)
    for obj in objs:
        ch.send(obj)
    return wire.frames


def _receiver(secret, nonce):
    a, b = socket.socketpair()
    return a, Channel(b, secret, nonce, WORKER_TO_ENGINE, ENGINE_TO_WORKER)


def test_channel_accepts_signed_messages_in_order():
    secret, nonce = new_secret(), os.urandom(16)
    a, rx = _receiver(secret, nonce)
    msgs = [{"op": "step", "seqs": [{"id": 1, "ids": [5, 6]}]}, {"op": "shutdown"}]
    for f in _frames(secret, nonce, msgs):
        a.sendall(f)
    assert [rx.recv(), rx.recv()] == msgs


@pytest.mark.parametrize("attack", ["tampered", "wrong secret", "other connection", "replayed", "reflected"])
def test_channel_refuses_a_bad_message(attack):
    secret, nonce = new_secret(), os.urandom(16)
    a, rx = _receiver(secret, nonce)
    good = _frames(secret, nonce, [{"op": "info"}, {"op": "step"}])
    if attack == "tampered":
        frame = bytearray(good[0])
        frame[-3] ^= 1  # inside the JSON payload
        bad = [bytes(frame)]
    elif attack == "wrong secret":
        bad = _frames(new_secret(), nonce, [{"op": "info"}])
    elif attack == "other connection":
        bad = _frames(secret, os.urandom(16), [{"op": "info"}])
    elif attack == "replayed":
        bad = [good[0], good[0]]
    else:  # the engine's own message sent back to it
        bad = _frames(secret, nonce, [{"op": "info"}], WORKER_TO_ENGINE, ENGINE_TO_WORKER)
    for f in bad:
        a.sendall(f)
    if attack == "replayed":
        assert rx.recv() == {"op": "info"}
    with pytest.raises(AuthError, match="refused"):
        rx.recv()


def test_a_worker_with_the_wrong_secret_is_refused():
    secret = new_secret()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    import threading

    result = {}

    def engine_side():
        ch = accept(server, secret)
        try:
            result["hello"] = ch.recv()
        except AuthError as exc:
            result["error"] = exc

    t = threading.Thread(target=engine_side)
    t.start()
    impostor = connect("127.0.0.1", port, new_secret())
    impostor.send({"hello": 0})
    t.join(10)
    server.close()
    assert isinstance(result.get("error"), AuthError)


# -- how work is split ----------------------------------------------------------------------------

def test_layer_ranges_cover_the_model_once():
    for layers, stages in [(2, 2), (7, 3), (30, 4), (61, 8)]:
        ranges = [PipelineStage(r, stages).layer_range(layers) for r in range(stages)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        PipelineStage(0, 3).layer_range(2)


def test_micro_batches_cut_the_token_stream_evenly():
    # two decodes and a 10-token prefill chunk starting at position 4, in two pieces of 6
    pieces = split_pieces([7, 3, 4], [1, 1, 10], 2)
    assert [p.chunks for p in pieces] == [[(0, 7, 1), (1, 3, 1), (2, 4, 4)], [(2, 8, 6)]]
    assert [p.chunks for p in split_pieces([5], [1], 4)] == [[(0, 5, 1)]]  # never an empty piece
    for starts, counts, k in [([0, 0, 0], [5, 1, 9], 3), ([2] * 7, [1] * 7, 4)]:
        pieces = split_pieces(starts, counts, k)
        sizes = [sum(n for _, _, n in p.chunks) for p in pieces]
        assert sum(sizes) == sum(counts) and max(sizes) - min(sizes) <= 1


# -- equal to one process ---------------------------------------------------------------------------

def _prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 1024) for _ in range(n)] for n in (1, 6, 45, 20)]


_PARAMS = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
           SamplingParams(temperature=0.9, top_k=50, seed=11, max_tokens=10, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3)]


def _generate(path, **kw):
    # small chunks: the 45-token prompt is prefilled over two steps beside running decodes
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_space_gb=0.02,
              max_num_batched_tokens=32, **kw)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _PARAMS)
        # again: now the prompts' full blocks come from the prefix cache (workers never computed them)
        again = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _PARAMS)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
        embedding = llm.engine.embed(_prompts()[2])
    finally:
        llm.engine.shutdown()
    return outs, embedding


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory):
    arch = request.param
    folder = save_safetensors(tiny_hf_model(arch, seed=1 if arch == "qwen2" else 2),
                              str(tmp_path_factory.mktemp(arch) / "st"))
    return arch, folder, _generate(folder)


CONFIGS = {"qwen2": [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
           "llama": [dict(tensor_parallel_size=2, pipeline_parallel_size=2)]}


def test_parallel_output_equals_one_process(tiny):
    arch, folder, (ref, ref_emb) = tiny
    for kw in CONFIGS[arch]:
        outs, emb = _generate(folder, **kw)
        for i, (a, b) in enumerate(zip(outs, ref)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"{arch} {kw} prompt {i}"
        lp, lp_ref = outs[1].outputs[0].logprobs, ref[1].outputs[0].logprobs
        assert [sorted(d) for d in lp] == [sorted(d) for d in lp_ref]
        assert all(abs(d[t] - r[t]) < 1e-4 for d, r in zip(lp, lp_ref) for t in d)
        assert max(abs(x - y) for x, y in zip(emb, ref_emb)) < 1e-4


def test_bad_parallel_sizes_are_clear_errors(tiny):
    _, folder, _ = tiny
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        LLM(folder, dtype="float32", skip_tokenizer_init=True, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="attention heads cannot be split evenly over tensor_parallel_size 3"):
        LLM(folder, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=3)
