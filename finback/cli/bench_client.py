"""One benchmark request against an Ollama- or OpenAI-compatible server, timed as it streams, and the
prompts the benchmark sends.

A request is timed from the moment it is sent: TTFT is the arrival of the first chunk that carries
text (answer or reasoning), each later text chunk adds one inter-token latency (a chunk may hold
several tokens when the server merges them; ITLs are per chunk, as vLLM's benchmark counts them),
and TPOT is (end-to-end - TTFT) / (output tokens - 1). Output tokens are the server's own count
(Ollama's `eval_count`, OpenAI's `usage.completion_tokens` from `stream_options.include_usage`) and
the number of text chunks only when the server gives none. A request fails on a non-200 status, an
error in the stream, a stream that ends without its final chunk, or no text at all; the error is
kept, never dropped.

Synthetic prompts are random sequences of common English words. Their token length is measured with
the server's own tokenizer: two probe requests (one output token each) report their prompt token
counts, which give tokens per word and the fixed overhead (BOS, chat template), so a prompt of I
tokens gets round((I - overhead) / slope) words. In the usual BPE vocabularies these words are one
token each, so the lengths are exact. When the server reports no prompt counts, one word is taken
as one token (`source: "words"`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ("the of and to in is was for on that with as by at from his her are be this have not but had "
         "they which one you were all we when there can an so said she who what been more will if no "
         "out do up time only new some could these two may first then any like now my over such "
         "our man me even most made after also did many before must well back through years where much "
         "your way down should because each just those people how too little state good very make "
         "world still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right used "
         "take three house water city small night part every place point light hand head king road "
         "music river letter window paper green color story money market number").split()


@dataclass
class Target:
    """Where and how to send: `api` is "ollama" or "openai"; `chat` picks /api/chat or
    /v1/chat/completions over /api/generate (raw) or /v1/completions."""
    url: str
    api: str
    model: str
    chat: bool = False
    ignore_eos: bool = False
    temperature: float = 0.0

    @property
    def endpoint(self) -> str:
        if self.api == "ollama":
            return "/api/chat" if self.chat else "/api/generate"
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def payload(self, prompt: str, output_len: int) -> dict[str, Any]:
        if self.api == "ollama":
            options: dict[str, Any] = {"num_predict": output_len, "temperature": self.temperature}
            if self.ignore_eos:
                options["ignore_eos"] = True
            body: dict[str, Any] = {"model": self.model, "stream": True, "options": options}
            if self.chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body.update(prompt=prompt, raw=True)
            return body
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": output_len, "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them, when it says

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def _ollama_text(obj: dict) -> str:
    msg = obj.get("message") or {}
    return (obj.get("response") or "") + (obj.get("thinking") or "") + (msg.get("content") or "") + \
        (msg.get("thinking") or "")


def _openai_text(obj: dict) -> str:
    out = ""
    for ch in obj.get("choices") or []:
        delta = ch.get("delta") or {}
        out += (ch.get("text") or "") + (delta.get("content") or "") + (delta.get("reasoning_content") or "") + \
            (delta.get("reasoning") or "")
    return out


async def send(client: httpx.AsyncClient, target: Target, prompt: str, output_len: int) -> RequestResult:
    """Send one streaming request and time it; never raises for a failed request."""
    res = RequestResult()
    chunks, done, usage_tokens = 0, False, None
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", target.url + target.endpoint, json=target.payload(prompt, output_len)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace").strip()
                res.error = f"HTTP {r.status_code}: {body[:200]}"
                return res
            async for line in r.aiter_lines():
                line = line.strip()
                if not line:
                    continue
                if target.api == "openai":
                    if not line.startswith("data:"):
                        continue  # SSE comments, event names
                    line = line[5:].strip()
                    if line == "[DONE]":
                        done = True
                        continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    res.error = f"bad stream line: {line[:120]}"
                    return res
                if not isinstance(obj, dict):
                    continue
                if obj.get("error"):
                    err = obj["error"]
                    res.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:200]
                    return res
                text = _ollama_text(obj) if target.api == "ollama" else _openai_text(obj)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
                if target.api == "ollama":
                    if obj.get("done"):
                        done = True
                        usage_tokens = obj.get("eval_count")
                        res.prompt_tokens = obj.get("prompt_eval_count")
                elif isinstance(obj.get("usage"), dict):
                    usage_tokens = obj["usage"].get("completion_tokens")
                    res.prompt_tokens = obj["usage"].get("prompt_tokens")
    except (httpx.HTTPError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.e2e = time.perf_counter() - t0
    if not done:
        res.error = "stream ended before its final chunk"
    elif chunks == 0:
        res.error = "no output"
    else:
        res.ok = True
        res.output_tokens = usage_tokens if isinstance(usage_tokens, int) and usage_tokens > 0 else chunks
    return res


# ------------------------------------------------------------------------------------ prompts

def random_words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


@dataclass
class Calibration:
    """prompt tokens = offset + slope * words, measured with the server's tokenizer."""
    slope: float = 1.0
    offset: float = 0.0
    source: str = "words"

    def words_for(self, tokens: int) -> int:
        return max(1, round((tokens - self.offset) / self.slope))


async def calibrate(client: httpx.AsyncClient, target: Target, input_len: int, rng: random.Random) -> Calibration:
    """Two probe requests; the server's prompt token counts give tokens per word and the overhead."""
    k1, k2 = 16, 16 + max(48, input_len)
    counts = []
    for k in (k1, k2):
        res = await send(client, target, random_words(k, rng), 1)
        if not res.ok:
            raise ValueError(f"probe request to {target.url}{target.endpoint} failed: {res.error}")
        counts.append(res.prompt_tokens)
    if not all(isinstance(c, int) and c > 0 for c in counts) or counts[1] <= counts[0]:
        return Calibration()
    slope = (counts[1] - counts[0]) / (k2 - k1)
    return Calibration(slope, counts[0] - slope * k1, "server")


def synthetic_prompts(n: int, input_len: int, output_len: int, cal: Calibration,
                      rng: random.Random) -> list[tuple[str, int]]:
    shortest = math.ceil(cal.offset + cal.slope)
    if input_len < shortest:
        raise ValueError(f"an input length of {input_len} tokens is below the {shortest} that the prompt's "
                         f"fixed part (BOS, chat template) and one word take")
    words = cal.words_for(input_len)
    return [(random_words(words, rng), output_len) for _ in range(n)]


def dataset_prompts(path: str, n: int, output_len: int | None, cal: Calibration,
                    rng: random.Random) -> list[tuple[str, int]]:
    """Prompts from a ShareGPT-style JSON file: a list of {"conversations": [{"from": "human", "value":
    ...}, {"from": "gpt", "value": ...}]} (or "role"/"content"; or plain {"prompt", "output_len"}).
    The first human turn is the prompt; the output length is `output_len`, else the reply's words
    times the calibrated tokens per word. Sampled with replacement when the file has fewer than n."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    items = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("prompt"), str):
            ref = entry.get("output_len")
            items.append((entry["prompt"], ref if isinstance(ref, int) and ref > 0 else None, None))
            continue
        turns = entry.get("conversations") or entry.get("messages") or []
        texts = [(t.get("from") or t.get("role"), t.get("value") or t.get("content")) for t in turns
                 if isinstance(t, dict)]
        for i, (who, text) in enumerate(texts):
            if who in ("human", "user") and isinstance(text, str) and text.strip():
                reply = texts[i + 1][1] if i + 1 < len(texts) and isinstance(texts[i + 1][1], str) else ""
                items.append((text, None, reply))
                break
    if not items:
        raise ValueError(f"{path}: no conversation with a human turn")
    picked = rng.sample(items, n) if len(items) >= n else [rng.choice(items) for _ in range(n)]
    out = []
    for prompt, ref_len, reply in picked:
        olen = output_len or ref_len or max(4, round(len((reply or "").split()) * cal.slope))
        out.append((prompt, olen))
    return out
