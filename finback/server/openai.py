"""OpenAI's API (/v1/*) as DeepSeek's API returns it: R1 reasoning in `reasoning_content`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from finback.engine.sampling import SamplingParams
from finback.prompt.reasoning import ReasoningSplitter, prompt_opens_reasoning
from finback.server.manager import LoadedModel, ModelManager
from finback.store.names import InvalidModelName, ModelNotFound

MAX_N = 8


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def _json(request: Request) -> dict:
    try:
        data = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    return data


def _num(data, key, default, kind=float, lo=None, hi=None):
    v = data.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise OpenAIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise OpenAIError(400, f"'{key}' must be between {lo} and {hi}", param=key)
    return v


def _params(data: dict, chat: bool) -> SamplingParams:
    max_tokens = data.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = data.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", None, int, 1)
    elif not chat:
        max_tokens = 16  # OpenAI's default for completions
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise OpenAIError(400, "'stop' must be a string or a list of strings", param="stop")
    if stop and len(stop) > 16:
        raise OpenAIError(400, "'stop' takes at most 16 strings", param="stop")
    logprobs = None
    if chat:
        if data.get("logprobs"):
            logprobs = _num(data, "top_logprobs", 0, int, 0, 20)
    elif data.get("logprobs") is not None:
        logprobs = _num(data, "logprobs", 0, int, 0, 5)
    rf = data.get("response_format")
    json_mode, json_schema = False, None
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            json_mode = True
        elif kind == "json_schema":
            from finback.engine.json_mode import SchemaError, check_schema
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise OpenAIError(400, "response_format.json_schema.schema must be an object", param="response_format")
            try:
                json_schema = check_schema(spec["schema"])
            except SchemaError as exc:
                raise OpenAIError(400, f"response_format: {exc}", param="response_format") from None
        elif kind not in ("text",):
            raise OpenAIError(400, f"response_format {kind!r} is not supported (text, json_object, json_schema)",
                              param="response_format")
    try:
        return SamplingParams(
            n=_num(data, "n", 1, int, 1, MAX_N),
            temperature=_num(data, "temperature", 1.0, float, 0, 2),
            top_p=_num(data, "top_p", 1.0, float, 0, 1) or 1.0,
            top_k=_num(data, "top_k", 0, int, -1),
            min_p=_num(data, "min_p", 0.0, float, 0, 1),
            presence_penalty=_num(data, "presence_penalty", 0.0, float, -2, 2),
            frequency_penalty=_num(data, "frequency_penalty", 0.0, float, -2, 2),
            repetition_penalty=_num(data, "repetition_penalty", 1.0, float, 0.01, 10),
            seed=_num(data, "seed", None, int, -(1 << 63), (1 << 63) - 1),
            stop=[s for s in stop or [] if s] or None,
            max_tokens=max_tokens,
            logprobs=logprobs,
            ignore_eos=bool(data.get("ignore_eos", False)),
            max_thinking_tokens=_num(data, "max_thinking_tokens", None, int, 0),
            json_mode=json_mode,
            json_schema=json_schema,
        )
    except ValueError as exc:
        raise OpenAIError(400, str(exc)) from None


def _sse(bodies) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: `data: {json}` blocks, an error block if the
    stream breaks, then `data: [DONE]`."""
    async def events():
        try:
            async for body in bodies:
                yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        except Exception as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def _completion_usage(ids: list[int], out) -> dict:
    n = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def _include_usage(data: dict) -> bool:
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise OpenAIError(400, "'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage"))


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise OpenAIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        return "".join(parts)
    raise OpenAIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")


def build_router(manager: ModelManager) -> APIRouter:
    router = APIRouter()
    store = manager.store

    async def _model(data: dict) -> LoadedModel:
        name = data.get("model")
        if not isinstance(name, str) or not name:
            raise OpenAIError(400, "'model' is required", param="model")
        try:
            return await manager.get(name)
        except (ModelNotFound, InvalidModelName):
            raise OpenAIError(404, f"The model '{name}' does not exist", param="model",
                              code="model_not_found") from None

    @router.get("/v1/models")
    async def models():
        rows = store.list()
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(m.modified_at.timestamp()),
                                            "owned_by": "library"} for m in rows]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for m in store.list():
            if m.name == model_id:
                return {"id": m.name, "object": "model", "created": int(m.modified_at.timestamp()),
                        "owned_by": "library"}
        raise OpenAIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    async def _gen(model: LoadedModel, ids: list[int], params: SamplingParams, request: Request):
        model.active += 1
        last = None
        try:
            async for out in model.engine.generate(ids, params):
                last = out
                yield out
                if await request.is_disconnected():
                    return
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None and last is not None:
                metrics.record_generation(request, model.name, last)
        finally:
            model.active -= 1
            manager.touch(model, None)

    def _oai_error(status, message):
        return OpenAIError(status, message, "invalid_request_error" if status < 500 else "server_error")

    async def _run(model: LoadedModel, ids: list[int], params: SamplingParams, request: Request):
        from finback.server.ollama import prime

        return await prime(_gen(model, ids, params, request), _oai_error)

    @router.post("/v1/chat/completions")
    async def chat(request: Request):
        data = await _json(request)
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise OpenAIError(400, "'messages' must be a non-empty list", param="messages")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise OpenAIError(400, f"messages[{i}] needs a role of system, user, assistant or tool",
                                  param="messages")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _content_text(m.get("content"), i)})
        params = _params(data, chat=True)
        model = await _model(data)
        from finback.server.ollama import APIError, _encode, _render_chat
        try:
            prompt, add_bos = _render_chat(model, messages, data.get("tools"), True)
            ids = _encode(model, prompt, add_bos)
        except APIError as exc:
            raise OpenAIError(exc.status, exc.message, param="messages") from None
        raw = bool(data.get("raw_reasoning", False))  # switch: return the raw text, no splitting
        opened = prompt_opens_reasoning(prompt)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = bool(data.get("stream", False))
        include_usage = _include_usage(data)
        splitters = [None if raw else ReasoningSplitter(start_in_reasoning=opened) for _ in range(params.n)]

        def split(i, text, final):
            s = splitters[i]
            if s is None:
                return "", text
            r, c = s.feed(text)
            if final:
                r2, c2 = s.flush()
                r, c = r + r2, c + c2
            return r, c

        def usage(out):
            completion = sum(len(o.token_ids) for o in out.outputs)
            return {"prompt_tokens": len(ids), "completion_tokens": completion,
                    "total_tokens": len(ids) + completion,
                    "prompt_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens},
                    "completion_tokens_details": {"reasoning_tokens": sum(o.reasoning_tokens for o in out.outputs)}}

        def logprobs_of(o, new_only):
            if o.logprobs is None:
                return None
            tok = model.tokenizer
            ids_ = o.new_token_ids if new_only else o.token_ids
            lps = o.logprobs[len(o.token_ids) - len(ids_):] if new_only else o.logprobs
            content = []
            for t, lp in zip(ids_, lps):
                text = tok.decode([t])
                content.append({"token": text, "logprob": lp.get(t, 0.0), "bytes": list(text.encode()),
                                "top_logprobs": [{"token": tok.decode([a]), "logprob": v, "bytes": list(tok.decode([a]).encode())}
                                                 for a, v in sorted(lp.items(), key=lambda kv: -kv[1])[:params.logprobs]]})
            return {"content": content}

        if stream:
            outs = await _run(model, ids, params, request)

            async def events():
                first = True
                last = None
                async for out in outs:
                    last = out
                    chunks = []
                    for o in out.outputs:
                        r, c = split(o.index, o.new_text, o.finish_reason is not None)
                        delta = {}
                        if first:
                            delta["role"] = "assistant"
                        if r:
                            delta["reasoning_content"] = r
                        if c:
                            delta["content"] = c
                        if delta or o.finish_reason:
                            chunks.append({"index": o.index, "delta": delta or {"content": ""},
                                           "logprobs": logprobs_of(o, True), "finish_reason": o.finish_reason})
                    first = False
                    if chunks:
                        body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": model.name, "system_fingerprint": "finback", "choices": chunks}
                        if include_usage:
                            body["usage"] = None
                        yield body
                if include_usage and last is not None:
                    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name,
                           "system_fingerprint": "finback", "choices": [], "usage": usage(last)}
            return _sse(events())

        last = None
        async for out in await _run(model, ids, params, request):
            last = out
        choices = []
        for o in last.outputs:
            s = ReasoningSplitter(start_in_reasoning=opened) if not raw else None
            if s is None:
                r, c = "", o.text
            else:
                r, c = s.feed(o.text)
                r2, c2 = s.flush()
                r, c = r + r2, c + c2
            msg = {"role": "assistant", "content": c}
            if not raw:
                msg["reasoning_content"] = r or None
            choices.append({"index": o.index, "message": msg, "logprobs": logprobs_of(o, False),
                            "finish_reason": o.finish_reason if o.finish_reason != "abort" else "stop"})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model.name,
                "system_fingerprint": "finback", "choices": choices, "usage": usage(last)}

    @router.post("/v1/completions")
    async def completions(request: Request):
        data = await _json(request)
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            prompt = None
        elif isinstance(prompt, str) and prompt:
            ids = None
        else:
            raise OpenAIError(400, "'prompt' must be a non-empty string or a list of token ids", param="prompt")
        params = _params(data, chat=False)
        model = await _model(data)
        if ids is None:
            ids = model.tokenizer.encode(prompt, add_special_tokens=True)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if data.get("stream"):
            include_usage = _include_usage(data)
            outs = await _run(model, ids, params, request)

            async def events():
                last = None
                async for out in outs:
                    last = out
                    choices = [{"index": o.index, "text": o.new_text, "logprobs": None,
                                "finish_reason": o.finish_reason} for o in out.outputs
                               if o.new_text or o.finish_reason]
                    if choices:
                        yield {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                               "choices": choices}
                if include_usage and last is not None:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                           "choices": [], "usage": _completion_usage(ids, last)}
            return _sse(events())
        last = None
        async for out in await _run(model, ids, params, request):
            last = out
        return {"id": rid, "object": "text_completion", "created": created, "model": model.name,
                "choices": [{"index": o.index, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                            for o in last.outputs],
                "usage": _completion_usage(ids, last)}

    return router
