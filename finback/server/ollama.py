"""Ollama's API (/api/*), field for field as Ollama documents it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import tempfile
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from finback.prompt.reasoning import CLOSE, OPEN, ReasoningSplitter, prompt_opens_reasoning, strip_reasoning
from finback.server.manager import LoadedModel, ModelManager
from finback.server.options import OptionError, parse_duration, sampling_params
from finback.store.names import InvalidModelName, ModelNotFound

OLLAMA_VERSION = "0.12.6"  # the Ollama API version we speak (clients check it)
ROLES = {"system", "user", "assistant", "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _model_field(data: dict) -> str:
    name = data.get("model") or data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise APIError(400, "model is required")
    return name


def _keep_alive(data: dict) -> float | None:
    if data.get("keep_alive") is None:
        return None
    try:
        return parse_duration(data["keep_alive"])
    except OptionError as exc:
        raise APIError(400, str(exc)) from None


def _think(data: dict) -> bool | None:
    think = data.get("think")
    if think is None or isinstance(think, bool):
        return think
    if think in ("high", "medium", "low"):  # effort levels: we have one level of thinking
        return True
    raise APIError(400, f"invalid think value {think!r}")


def _stats(out, model: LoadedModel) -> dict[str, Any]:
    load = 0
    if model.pending_load_report:
        load, model.pending_load_report = model.load_duration_ns, False
    return {"total_duration": out.total_duration + load, "load_duration": load,
            "prompt_eval_count": out.prompt_eval_count, "prompt_eval_duration": out.prompt_eval_duration,
            "eval_count": out.eval_count, "eval_duration": out.eval_duration}


def _done_reason(out) -> str:
    reason = out.outputs[0].finish_reason
    return {"stop": "stop", "length": "length", "abort": "stop"}.get(reason or "stop", "stop")


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise APIError(400, "messages must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string")
        if m.get("images"):
            raise APIError(400, "this model does not support images")
        msg = {"role": role, "content": content}
        for k in ("tool_calls", "tool_name", "thinking"):
            if m.get(k) is not None:
                msg[k] = m[k]
        out.append(msg)
    return out


def strip_history_reasoning() -> bool:
    """Assistant turns coming back lose their reasoning before templating (DeepSeek's advice);
    FINBACK_KEEP_HISTORY_REASONING=1 keeps it."""
    return os.environ.get("FINBACK_KEEP_HISTORY_REASONING", "") not in ("1", "true", "yes")


def _render_chat(model: LoadedModel, messages: list[dict], tools, think: bool | None) -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add BOS (Go templates don't write it)."""
    history = []
    strip = strip_history_reasoning()
    for m in messages:
        if m["role"] == "assistant" and strip:
            m = {k: v for k, v in m.items() if k != "thinking"}
            m["content"] = strip_reasoning(m["content"])
        history.append(m)
    if model.system and not any(m["role"] == "system" for m in history):
        history.insert(0, {"role": "system", "content": model.system})
    history = list(model.messages) + history
    try:
        if model.template_kind == "go":
            from finback.prompt.gotemplate import render_ollama_chat

            return render_ollama_chat(model.template, history, tools=tools, think=think), True
        if model.template_kind == "jinja":
            kwargs = {"tools": tools} if tools else {}
            return model.template.render(history, add_generation_prompt=True, **kwargs), False
    except ValueError as exc:  # template errors: the request's fault (e.g. roles out of order)
        raise APIError(400, f"cannot apply the chat template: {exc}") from None
    return "".join(m["content"] for m in history), True


def _encode(model: LoadedModel, prompt: str, add_bos: bool) -> list[int]:
    ids = model.tokenizer.encode(prompt, add_special_tokens=add_bos)
    if not ids:
        raise APIError(400, "the prompt is empty")
    return ids


class _Split:
    """Reasoning handling for one response, by the request's `think`:
    True -> reasoning in `thinking`; False -> reasoning dropped; None -> raw text (with the
    opening tag the template wrote put back, so clients that parse <think> see a whole block)."""

    def __init__(self, think: bool | None, opened: bool):
        self.think = think
        self.splitter = ReasoningSplitter(start_in_reasoning=opened) if think is not None else None
        self.prefix = OPEN + "\n" if (think is None and opened) else ""

    def feed(self, text: str) -> tuple[str, str]:
        if self.splitter is None:
            text, self.prefix = self.prefix + text, ""
            return "", text
        r, c = self.splitter.feed(text)
        return (r if self.think else ""), c

    def flush(self) -> tuple[str, str]:
        if self.splitter is None:
            text, self.prefix = self.prefix, ""
            return "", text
        r, c = self.splitter.flush()
        return (r if self.think else ""), c


async def prime(agen, bad_request):
    """Run a generator to its first item now, so an invalid request (ValueError from the engine:
    token ids out of range, ...) becomes a 400 before any response has started; a dead engine
    becomes a 503. Returns a generator that yields that first item, then the rest."""
    from finback.engine.async_engine import EngineDeadError

    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = None
    except EngineDeadError as exc:
        raise bad_request(503, str(exc)) from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_request(400, str(exc)) from None

    async def rest():
        if first is None:
            return
        yield first
        async for item in agen:
            yield item
    return rest()


def build_router(manager: ModelManager) -> APIRouter:
    router = APIRouter()
    store = manager.store

    def _unload_only(data: dict, empty: bool) -> str | None:
        """keep_alive 0 with nothing to generate: unload without loading first (`ollama stop`)."""
        if not empty or _keep_alive(data) != 0:
            return None
        name = _model_field(data)
        try:
            key = manager.canonical(name)
        except (ModelNotFound, InvalidModelName):
            raise APIError(404, f"model '{name}' not found")
        if key not in manager.loaded and not store.exists(name) and not os.path.exists(name):
            raise APIError(404, f"model '{name}' not found")
        manager.unload(key)
        return key

    async def _load(data: dict) -> LoadedModel:
        name = _model_field(data)
        try:
            return await manager.get(name, _keep_alive(data))
        except (ModelNotFound, InvalidModelName) as exc:
            raise APIError(404, f"model '{name}' not found" if isinstance(exc, InvalidModelName) else str(exc))

    async def _generate_stream(model: LoadedModel, ids: list[int], params, think, opened, keep_alive,
                               request: Request, extra_final=None) -> AsyncIterator[dict]:
        split = _Split(think, opened)
        model.active += 1
        try:
            last = None
            async for out in model.engine.generate(ids, params):
                last = out
                r, c = split.feed(out.outputs[0].new_text)
                if out.finished:
                    r2, c2 = split.flush()
                    r, c = r + r2, c + c2
                if r or c:
                    yield {"thinking": r, "content": c, "done": False}
                if await request.is_disconnected():
                    return  # closing the generator aborts the request
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.record_generation(request, model.name, last)
            final = {"done": True, "done_reason": _done_reason(last), **_stats(last, model)}
            if extra_final:
                final.update(extra_final(last) if callable(extra_final) else extra_final)
            yield final
        finally:
            model.active -= 1
            manager.touch(model, keep_alive)  # keep_alive counts from the end of the request

    def _shape_chat(model: LoadedModel, piece: dict) -> dict:
        msg = {"role": "assistant", "content": piece.get("content", "")}
        if piece.get("thinking"):
            msg["thinking"] = piece["thinking"]
        out = {"model": model.name, "created_at": now_iso(), "message": msg, "done": piece["done"]}
        if piece["done"]:
            out.update({k: v for k, v in piece.items() if k not in ("content", "thinking", "done")})
        return out

    def _shape_generate(model: LoadedModel, piece: dict) -> dict:
        out = {"model": model.name, "created_at": now_iso(), "response": piece.get("content", ""),
               "done": piece["done"]}
        if piece.get("thinking"):
            out["thinking"] = piece["thinking"]
        if piece["done"]:
            out.update({k: v for k, v in piece.items() if k not in ("content", "thinking", "done")})
        return out

    async def _respond(stream: bool, pieces: AsyncIterator[dict], shape, model: LoadedModel):
        if stream:
            async def lines():
                try:
                    async for piece in pieces:
                        yield (json.dumps(shape(model, piece), ensure_ascii=False) + "\n").encode()
                except Exception as exc:  # mid-stream failure: Ollama sends an error line
                    yield (json.dumps({"error": str(exc)}) + "\n").encode()
            return StreamingResponse(lines(), media_type="application/x-ndjson")
        content, thinking, final = [], [], None
        async for piece in pieces:
            content.append(piece.get("content", ""))
            thinking.append(piece.get("thinking", ""))
            if piece["done"]:
                final = piece
        final = dict(final, content="".join(content), thinking="".join(thinking))
        return JSONResponse(shape(model, final))

    def _params(model: LoadedModel, data: dict, json_mode: bool = False):
        try:
            params = sampling_params(data.get("options"), model.params, model.context_length)
        except OptionError as exc:
            raise APIError(400, str(exc)) from None
        params.json_mode = json_mode is True
        params.json_schema = json_mode if isinstance(json_mode, dict) else None
        return params

    def _json_mode(data: dict):
        """False, True ("json") or a checked JSON schema."""
        fmt = data.get("format")
        if fmt in (None, ""):
            return False
        if fmt == "json":
            return True
        if isinstance(fmt, dict):
            from finback.engine.json_mode import SchemaError, check_schema
            try:
                return check_schema(fmt)
            except SchemaError as exc:
                raise APIError(400, f"format: {exc}") from None
        raise APIError(400, f'invalid format {fmt!r}: use "json" or a JSON schema')

    @router.get("/api/version")
    @router.head("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION}

    @router.post("/api/chat")
    async def chat(request: Request):
        data = await read_json(request)
        json_mode = _json_mode(data)
        messages = _check_messages(data.get("messages") or [])
        think = _think(data)
        key = _unload_only(data, not messages)
        if key is not None:
            return JSONResponse({"model": key, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": "unload"})
        model = await _load(data)
        ka = _keep_alive(data)
        if not messages:  # load (or unload) only
            if ka == 0:
                manager.unload(model.name)
                reason = "unload"
            else:
                reason = "load"
            return JSONResponse({"model": model.name, "created_at": now_iso(),
                                 "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": reason})
        params = _params(model, data, json_mode)
        prompt, add_bos = _render_chat(model, messages, data.get("tools"), think)
        opened = prompt_opens_reasoning(prompt)
        if think is False and opened:
            prompt += CLOSE + "\n\n"  # skip the reasoning: the block is closed before generation
            opened = False
        ids = _encode(model, prompt, add_bos)
        try:
            pieces = await prime(_generate_stream(model, ids, params, think, opened, ka, request), APIError)
            return await _respond(data.get("stream", True) is not False, pieces, _shape_chat, model)
        finally:
            if ka == 0:
                manager.unload(model.name)

    @router.post("/api/generate")
    async def generate(request: Request):
        data = await read_json(request)
        json_mode = _json_mode(data)
        if data.get("images"):
            raise APIError(400, "this model does not support images")
        prompt = data.get("prompt") or ""
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        think = _think(data)
        key = _unload_only(data, not prompt and not data.get("context"))
        if key is not None:
            return JSONResponse({"model": key, "created_at": now_iso(), "response": "", "done": True,
                                 "done_reason": "unload"})
        model = await _load(data)
        ka = _keep_alive(data)
        if not prompt and not data.get("context"):
            if ka == 0:
                manager.unload(model.name)
            return JSONResponse({"model": model.name, "created_at": now_iso(), "response": "", "done": True,
                                 "done_reason": "unload" if ka == 0 else "load"})
        params = _params(model, data, json_mode)
        if data.get("raw"):
            text, add_bos = prompt, False
        elif data.get("template"):
            if not isinstance(data["template"], str):
                raise APIError(400, "template must be a string")
            from finback.prompt.gotemplate import GoTemplate, GoTemplateError, render_ollama
            try:
                text = render_ollama(GoTemplate(data["template"]), system=data.get("system") or model.system or None,
                                     prompt=prompt, messages=None, think=think)
            except GoTemplateError as exc:
                raise APIError(400, f"invalid template: {exc}") from None
            add_bos = True
        else:
            msgs = []
            system = data.get("system") if data.get("system") is not None else None
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": prompt})
            text, add_bos = _render_chat(model, msgs, None, think)
        context = data.get("context") or []
        if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
            raise APIError(400, "context must be a list of token ids")
        opened = prompt_opens_reasoning(text)
        if think is False and opened:
            text += CLOSE + "\n\n"
            opened = False
        ids = list(context) + _encode(model, text, add_bos and not context)
        try:
            def final(out):
                return {"context": ids + list(out.outputs[0].token_ids)}
            pieces = await prime(_generate_stream(model, ids, params, think, opened, ka, request,
                                                  extra_final=final), APIError)
            return await _respond(data.get("stream", True) is not False, pieces, _shape_generate, model)
        finally:
            if ka == 0:
                manager.unload(model.name)

    @router.get("/api/tags")
    async def tags():
        models = await asyncio.to_thread(store.list)
        return {"models": [m.to_dict() for m in models]}

    @router.get("/api/ps")
    async def ps():
        return {"models": manager.ps()}

    @router.post("/api/show")
    async def show(request: Request):
        data = await read_json(request)
        name = _model_field(data)
        try:
            info = await asyncio.to_thread(store.show, name, bool(data.get("verbose")))
        except (ModelNotFound, InvalidModelName):
            raise APIError(404, f"model '{name}' not found")
        from finback.store.modelfile import Modelfile

        mf = Modelfile(from_=name, template=info.get("template") or None, system=info.get("system") or None,
                       parameters=info.get("parameters") or {}, messages=info.get("messages") or [],
                       license=info.get("license") or [])
        text = mf.to_text()
        params_text = "\n".join(line[len("PARAMETER "):] for line in text.splitlines()
                                if line.startswith("PARAMETER "))
        template = info.get("template") or ""
        if not template:
            md = info.get("model_info") or {}
            template = md.get("tokenizer.chat_template") or ""
        capabilities = ["completion"]
        if "<think>" in template or "deepseek" in json.dumps(info.get("details", {})).lower():
            capabilities.append("thinking")
        if ".Tools" in template or "tools" in template:
            capabilities.append("tools")
        return {"modelfile": text, "parameters": params_text, "template": template,
                "system": info.get("system") or "", "license": "\n".join(info.get("license") or []),
                "details": info.get("details") or {}, "model_info": info.get("model_info") or {},
                "capabilities": capabilities, "modified_at": info["modified_at"].isoformat()}

    @router.post("/api/pull")
    async def pull(request: Request):
        data = await read_json(request)
        name = _model_field(data)
        from finback.store.pull import pull as do_pull

        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def progress(status, digest, total, completed):
            item = {"status": status}
            if digest:
                item.update(digest=digest, total=total, completed=completed)
            loop.call_soon_threadsafe(q.put_nowait, item)

        async def run():
            try:
                await asyncio.to_thread(do_pull, store, name, progress)  # its progress ends with "success"
                await q.put(None)
            except Exception as exc:
                await q.put(exc)

        task = asyncio.create_task(run())

        async def events():
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item

        if data.get("stream", True) is False:
            async for item in events():
                if isinstance(item, Exception):
                    await task
                    raise _pull_error(item, name)
            return {"status": "success"}

        async def lines():
            async for item in events():
                if isinstance(item, Exception):
                    yield (json.dumps({"error": str(_pull_error(item, name).message)}) + "\n").encode()
                    return
                yield (json.dumps(item) + "\n").encode()
            await task
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.head("/api/blobs/{digest}")
    async def blob_exists(digest: str):
        from finback.store.blobs import InvalidDigest, has_blob
        try:
            ok = has_blob(store.root, digest)
        except (InvalidDigest, ValueError):
            raise APIError(400, f"invalid digest {digest!r}")
        return Response(status_code=200 if ok else 404)

    @router.post("/api/blobs/{digest}")
    async def blob_upload(digest: str, request: Request):
        from finback.store import blobs
        try:
            blobs.check_digest(digest)
        except ValueError:
            raise APIError(400, f"invalid digest {digest!r}")
        if blobs.has_blob(store.root, digest):
            return Response(status_code=200)
        os.makedirs(blobs.blobs_dir(store.root), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs.blobs_dir(store.root), prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            try:
                await asyncio.to_thread(blobs.write_blob_from_file, store.root, tmp, digest)
            except blobs.DigestMismatch as exc:
                raise APIError(400, f"digest mismatch: {exc}") from None
        except OSError as exc:
            raise APIError(500, f"cannot store the blob: {exc}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return Response(status_code=201)

    @router.post("/api/create")
    async def create(request: Request):
        data = await read_json(request)
        name = _model_field(data)
        if data.get("quantize"):
            raise APIError(400, "quantize is not supported yet by finback")
        if data.get("adapters"):
            raise APIError(400, "adapters are not supported")
        files = data.get("files") or {}
        base = data.get("from")
        tmpdir = None
        try:
            if files:
                from finback.store import blobs
                if not isinstance(files, dict):
                    raise APIError(400, "files must map file names to digests")
                tmpdir = tempfile.mkdtemp(prefix="finback-create-")
                first = None
                for fname, digest in sorted(files.items()):
                    if os.path.basename(fname) != fname or fname in ("", ".", ".."):
                        raise APIError(400, f"invalid file name {fname!r}")
                    try:
                        path = blobs.digest_path(store.root, digest)
                    except ValueError:
                        raise APIError(400, f"invalid digest {digest!r}")
                    if not os.path.isfile(path):
                        raise APIError(400, f"blob {digest} for {fname} was not uploaded")
                    os.symlink(path, os.path.join(tmpdir, fname))
                    first = first or os.path.join(tmpdir, fname)
                ggufs = sorted(f for f in files if f.endswith(".gguf"))
                base = os.path.join(tmpdir, ggufs[0]) if ggufs else (tmpdir if len(files) > 1 else first)
            if not base:
                raise APIError(400, "neither 'from' nor 'files' was given")
            params = data.get("parameters")
            license_ = data.get("license")
            statuses = []

            def progress(status, *_):
                statuses.append(status)

            try:
                await asyncio.to_thread(
                    store.create, name, base, template=data.get("template"), system=data.get("system"),
                    params=params, messages=data.get("messages"), license=license_, link=True,
                    progress=progress)
            except (ModelNotFound, InvalidModelName, ValueError, TypeError) as exc:
                raise APIError(400, str(exc)) from None
        finally:
            if tmpdir:
                import shutil
                shutil.rmtree(tmpdir, ignore_errors=True)
        manager.unload(manager.canonical(name))  # a loaded model of that name is stale now
        items = [{"status": "using existing layer"}, {"status": "writing manifest"}, {"status": "success"}]
        if data.get("stream", True) is False:
            return {"status": "success"}
        return StreamingResponse(((json.dumps(i) + "\n").encode() for i in items),
                                 media_type="application/x-ndjson")

    @router.post("/api/copy")
    async def copy(request: Request):
        data = await read_json(request)
        src, dst = data.get("source"), data.get("destination")
        if not isinstance(src, str) or not isinstance(dst, str) or not src or not dst:
            raise APIError(400, "source and destination are required")
        try:
            await asyncio.to_thread(store.copy, src, dst)
        except ModelNotFound:
            raise APIError(404, f"model '{src}' not found")
        except InvalidModelName as exc:
            raise APIError(400, str(exc))
        return Response(status_code=200)

    @router.delete("/api/delete")
    async def delete(request: Request):
        data = await read_json(request)
        name = _model_field(data)
        try:
            key = manager.canonical(name)
            if not store.exists(name):
                raise APIError(404, f"model '{name}' not found")
            manager.unload(key)
            await asyncio.to_thread(store.delete, name)
        except (ModelNotFound, InvalidModelName):
            raise APIError(404, f"model '{name}' not found")
        return Response(status_code=200)

    async def _embed_texts(model: LoadedModel, texts: list[str], truncate: bool, normalize: bool):
        vectors, count = [], 0
        for text in texts:
            ids = model.tokenizer.encode(text, add_special_tokens=True)
            if len(ids) > model.context_length:
                if not truncate:
                    raise APIError(400, "the input length exceeds the context length")
                ids = ids[:model.context_length]
            count += len(ids)
            try:
                vectors.append(await model.engine.embed(ids, normalize))
            except ValueError as exc:
                raise APIError(400, str(exc)) from None
        return vectors, count

    @router.post("/api/embed")
    async def embed(request: Request):
        """Mean-pooled, L2-normalised final hidden states per input (Ollama's shape)."""
        data = await read_json(request)
        inputs = data.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise APIError(400, "input must be a string or a list of strings")
        t0 = time.perf_counter_ns()
        model = await _load(data)
        vectors, count = await _embed_texts(model, inputs, data.get("truncate", True) is not False, True)
        dims = data.get("dimensions")
        if dims is not None:
            if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
                raise APIError(400, "dimensions must be a positive integer")
            import math
            cut = []
            for v in vectors:
                v = v[:dims]
                norm = math.sqrt(sum(x * x for x in v)) or 1.0
                cut.append([x / norm for x in v])
            vectors = cut
        load = model.load_duration_ns if model.pending_load_report else 0
        model.pending_load_report = False
        return {"model": model.name, "embeddings": vectors, "total_duration": time.perf_counter_ns() - t0,
                "load_duration": load, "prompt_eval_count": count}

    @router.post("/api/embeddings")
    async def embeddings(request: Request):
        """The older route: one prompt, one vector, not normalised."""
        data = await read_json(request)
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        model = await _load(data)
        if not prompt:
            return {"embedding": []}
        vectors, _ = await _embed_texts(model, [prompt], True, False)
        return {"embedding": vectors[0]}

    return router


def _pull_error(exc: Exception, name: str) -> APIError:
    if isinstance(exc, (ModelNotFound, InvalidModelName)):
        return APIError(404, f"pull model manifest: file does not exist: {exc}")
    return APIError(500, f"pull failed: {exc}")
