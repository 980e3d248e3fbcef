"""`finback bench`: its numbers against a server whose timings the test controls, and a run against a
live `finback serve` on the embedded model.

The controlled server (Starlette under uvicorn, in a thread) streams every generation the same way:
TTFT seconds of silence, then CHUNKS text chunks GAP seconds apart, each holding TOKENS_PER_CHUNK
tokens by the usage it reports, over Ollama's NDJSON or OpenAI's SSE. It counts prompt tokens as
words + OVERHEAD, so the bench's calibration has a known answer. Every 8th measured request fails
with an HTTP 500, and every 8th (shifted by 4) fails mid-stream with an error line.

Tolerance: measured medians may be at most 5 ms under the true value (timer granularity) and at most
60 ms over it for each sleep of the server in the interval (scheduling on a loaded 2-core machine,
HTTP and JSON overhead): TTFT and ITL span one sleep, E2E spans CHUNKS, TPOT spans CHUNKS - 1 sleeps
shared by OUTPUT_LEN - 1 tokens. Token counts are exact.
"""

import asyncio
import json
import threading
import time

import pytest

from fbtest import free_port, live_server

TTFT, GAP, CHUNKS, TOKENS_PER_CHUNK, OVERHEAD = 0.20, 0.05, 6, 2, 3
OUTPUT_LEN = CHUNKS * TOKENS_PER_CHUNK
EARLY, LATE = 0.005, 0.060


def _app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    state = {"measured": 0, "seen": []}

    async def body_of(request):
        data = await request.json()
        prompt = data.get("prompt") or data["messages"][-1]["content"]
        n = data["options"]["num_predict"] if "options" in data else data["max_tokens"]
        state["seen"].append((prompt, n))
        fail = None
        if n == OUTPUT_LEN:  # the measured requests (probes ask for 1 token, the warm-up for 8)
            state["measured"] += 1
            fail = {1: "status", 5: "stream"}.get(state["measured"] % 8)
        return len(prompt.split()) + OVERHEAD, fail

    async def timed(lines, fail):
        await asyncio.sleep(TTFT)
        for i in range(CHUNKS):
            if i:
                await asyncio.sleep(GAP)
            yield lines(i)
            if fail == "stream" and i == 1:
                yield lines(-1)
                return
        yield lines(CHUNKS)

    async def generate(request):
        prompt_tokens, fail = await body_of(request)
        if fail == "status":
            return JSONResponse({"error": "injected failure"}, status_code=500)

        def line(i):
            if i < 0:
                return json.dumps({"error": "injected stream failure"}) + "\n"
            if i == CHUNKS:
                return json.dumps({"response": "", "done": True, "eval_count": OUTPUT_LEN,
                                   "prompt_eval_count": prompt_tokens}) + "\n"
            return json.dumps({"response": "ab", "done": False}) + "\n"
        return StreamingResponse(timed(line, fail), media_type="application/x-ndjson")

    async def completions(request):
        prompt_tokens, fail = await body_of(request)
        if fail == "status":
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)

        def event(i):
            if i < 0:
                return 'data: {"error": {"message": "injected stream failure"}}\n\n'
            if i == CHUNKS:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": OUTPUT_LEN,
                         "total_tokens": prompt_tokens + OUTPUT_LEN}
                return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
            return f"data: {json.dumps({'choices': [{'index': 0, 'text': 'ab'}]})}\n\n"
        return StreamingResponse(timed(event, fail), media_type="text/event-stream")

    async def version(request):
        return JSONResponse({"version": "0.0.0"})

    app = Starlette(routes=[Route("/api/version", version), Route("/api/generate", generate, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"])])
    app.state.bench = state
    return app


@pytest.fixture
def timed_server():
    import uvicorn

    port = free_port()
    app = _app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.bench
    server.should_exit = True
    thread.join(10)


def _near(measured_ms: float, true_s: float, what: str, sleeps: float = 1):
    true_ms = true_s * 1000
    assert true_ms - EARLY * 1000 <= measured_ms <= true_ms + LATE * 1000 * sleeps, \
        f"{what}: {measured_ms:.1f} ms vs {true_ms} ms"


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_numbers_match_a_server_with_known_timings(timed_server, tmp_path, api, capsys):
    from finback.cli.main import main

    timed_server, _ = timed_server
    out = tmp_path / "bench.json"
    rc = main(["bench", timed_server, "--api", api, "--model", "m", "-c", "2", "-n", "8", "--input-len", "20",
               "--output-len", str(OUTPUT_LEN), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Throughput" in printed and "Latency" in printed and "injected" in printed
    report = json.loads(out.read_text())
    assert report["api"] == api and report["prompt_calibration"] == {"source": "server", "tokens_per_word": 1.0,
                                                                      "overhead": float(OVERHEAD)}
    (level,) = report["levels"]
    assert (level["concurrency"], level["num_requests"], level["completed"], level["failed"]) == (2, 8, 6, 2)
    assert sum(level["errors"].values()) == 2 and any("HTTP 500" in e for e in level["errors"])
    assert any("injected stream failure" in e for e in level["errors"])
    assert level["mean_input_tokens"] == 20 and level["mean_output_tokens"] == OUTPUT_LEN  # from usage
    _near(level["ttft_ms"]["p50"], TTFT, "TTFT")
    _near(level["itl_ms"]["p50"], GAP, "ITL")
    _near(level["tpot_ms"]["p50"], GAP * (CHUNKS - 1) / (OUTPUT_LEN - 1), "TPOT", (CHUNKS - 1) / (OUTPUT_LEN - 1))
    _near(level["e2e_ms"]["p50"], TTFT + GAP * (CHUNKS - 1), "E2E", CHUNKS)
    assert level["output_throughput"] == pytest.approx(6 * OUTPUT_LEN / level["duration_s"])


def test_slo_search_finds_the_limit(timed_server, tmp_path, capsys):
    """TTFT does not grow with load here, so a TTFT bound above it holds at every level and the search
    doubles up to its cap; a bound below it holds nowhere."""
    from finback.cli.main import main

    timed_server, _ = timed_server
    common = [timed_server, "--api", "ollama", "-m", "m", "-n", "2", "--input-len", "8", "--output-len", "1"]
    assert main(["bench", *common, "--slo-ttft-ms", str(TTFT * 1000 + 300), "--max-search-concurrency", "4",
                 "--json", str(tmp_path / "a.json")]) == 0
    slo = json.loads((tmp_path / "a.json").read_text())["slo"]
    assert slo["max_concurrency"] == 4 and slo["tried"] == {"1": True, "2": True, "4": True}
    assert "Highest concurrency holding TTFT p90 <= 500 ms: 4" in capsys.readouterr().out
    assert main(["bench", *common, "--slo-ttft-ms", "50", "--json", str(tmp_path / "b.json")]) == 0
    slo = json.loads((tmp_path / "b.json").read_text())["slo"]
    assert slo["max_concurrency"] is None and slo["tried"] == {"1": False}
    assert "No concurrency tried holds" in capsys.readouterr().out


def test_dataset_at_a_poisson_rate(timed_server, tmp_path):
    """ShareGPT-style prompts are sent as written (the first human turn), each with its reply's length in
    tokens (words times the calibrated tokens per word, here 1; at least 4) as the output length."""
    from finback.cli.main import main

    url, state = timed_server
    convs = [{"conversations": [{"from": "human", "value": "name three rivers"},
                                {"from": "gpt", "value": "the nile and the amazon and the danube"}]},
             {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi there"},
                                {"from": "gpt", "value": "hello to you"}]},
             {"conversations": [{"from": "gpt", "value": "no human turn: skipped"}]}]
    (tmp_path / "sharegpt.json").write_text(json.dumps(convs))
    assert main(["bench", url, "--api", "openai", "-m", "m", "--dataset", str(tmp_path / "sharegpt.json"), "-n", "2",
                 "--request-rate", "20", "--json", str(tmp_path / "out.json")]) == 0
    assert sorted(state["seen"][-2:]) == [("hi there", 4), ("name three rivers", 8)]
    (level,) = json.loads((tmp_path / "out.json").read_text())["levels"]
    assert (level["request_rate"], level["num_requests"], level["completed"]) == (20.0, 2, 2)


def test_bad_arguments_are_clear_errors(capsys):
    from finback.cli.main import main

    assert main(["bench", "http://127.0.0.1:9", "-c", "1", "--request-rate", "2"]) == 1
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "-c", "0"])


def test_against_live_finback_serve(tmp_path, smollm2_path, capsys):
    from finback.cli.main import main

    with live_server(tmp_path / "models", {"FINBACK_API_KEY": None}) as srv:
        runs = (("ollama", ["-c", "1,2"], 24), ("openai", ["--chat", "--request-rate", "inf"], 40))
        for api, extra, input_len in runs:
            js, png = tmp_path / f"{api}.json", tmp_path / f"{api}.png"
            assert main(["bench", srv.url, "--api", api, "-m", "smollm2:135m", "-n", "2", "--input-len", str(input_len),
                         "--output-len", "4", *extra, "--json", str(js), "--plot", str(png)]) == 0
            printed = capsys.readouterr().out
            assert "Throughput" in printed and "TTFT" in printed and "TPOT" in printed
            report = json.loads(js.read_text())
            for level in report["levels"]:
                assert level["failed"] == 0 and level["completed"] == 2
                assert level["output_throughput"] > 0 and level["ttft_ms"]["p50"] > 0
                assert level["mean_input_tokens"] == input_len  # calibrated with the server's tokenizer
                assert level["mean_output_tokens"] == 4  # ignore_eos: exact lengths on both APIs
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [lv["concurrency"] for lv in json.loads((tmp_path / "ollama.json").read_text())["levels"]] == [1, 2]
        # the chat template alone is longer than this: a clear error, not a silently longer prompt
        assert main(["bench", srv.url, "--api", "openai", "--chat", "-m", "smollm2:135m", "--input-len", "5"]) == 1
        assert "below the" in capsys.readouterr().err
