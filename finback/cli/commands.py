"""The client commands that manage models: pull, list, ps, show, create, rm, cp, stop.

Each talks to the server over Ollama's API (starting one in the background if none answers)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from typing import Any

from finback.cli import fmt
from finback.cli.client import APIStatusError, CLIError, Client


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# ---------------------------------------------------------------------------------------- pull

class _LayerProgress:
    """One rich progress bar per layer digest, status lines for the rest (Ollama's pull view)."""

    def __init__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn

        self.console = _err_console()
        self.progress = Progress(TextColumn("{task.description}"), TaskProgressColumn(), BarColumn(),
                                 DownloadColumn(binary_units=False), console=self.console)
        self.tasks: dict[str, Any] = {}
        self.last_status = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tasks:  # started with the first layer: status-only pulls leave no empty bar behind
            self.progress.stop()

    def update(self, item: dict) -> None:
        status = item.get("status", "")
        digest = item.get("digest")
        if digest:
            total, done = int(item.get("total") or 0), int(item.get("completed") or 0)
            task = self.tasks.get(digest)
            label = f"pulling {digest.removeprefix('sha256:')[:12]}"
            if task is None:
                if not self.tasks:
                    self.progress.start()
                self.tasks[digest] = self.progress.add_task(label, total=total or None, completed=done)
            else:
                self.progress.update(task, total=total or None, completed=done)
            return
        if status and status != self.last_status:
            self.last_status = status
            self.progress.console.print(status, markup=False)


def pull(client: Client, name: str, quiet: bool = False) -> None:
    with client.stream("/api/pull", {"model": name, "stream": True}) as stream:
        if quiet:
            for _ in stream:
                pass
            return
        with _LayerProgress() as view:
            for item in stream:
                view.update(item)


# ---------------------------------------------------------------------------------------- list / ps

def list_models(client: Client) -> None:
    models = client.json("GET", "/api/tags").get("models") or []
    rows = [[m.get("name") or m.get("model", ""), (m.get("digest") or "").removeprefix("sha256:")[:12],
             fmt.human_bytes(int(m.get("size") or 0)), fmt.human_time(m.get("modified_at"))]
            for m in models]
    print(fmt.table(["NAME", "ID", "SIZE", "MODIFIED"], rows))


def _processor(size: int, vram: int) -> str:
    if vram == 0 or size == 0:
        return "100% CPU"
    if vram >= size:
        return "100% GPU"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def ps(client: Client) -> None:
    models = client.json("GET", "/api/ps").get("models") or []
    rows = []
    for m in models:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        until = fmt.human_time(m.get("expires_at"), zero="Never")
        if until.endswith(" ago"):
            until = "Stopping..."
        rows.append([m.get("name") or m.get("model", ""), (m.get("digest") or "").removeprefix("sha256:")[:12],
                     fmt.human_bytes(size), _processor(size, vram), str(m.get("context_length") or ""), until])
    print(fmt.table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows))


# ---------------------------------------------------------------------------------------- show

def show_info(client: Client, name: str) -> dict:
    return client.json("POST", "/api/show", {"model": name})


def summary(info: dict) -> str:
    """`ollama show NAME`: Model, Capabilities, Parameters, System, License sections."""
    mi = info.get("model_info") or {}
    det = info.get("details") or {}
    arch = mi.get("general.architecture") or det.get("family") or mi.get("model_type") or ""
    rows = [("architecture", arch)]
    count = mi.get("general.parameter_count") or det.get("parameter_count")
    if count:
        from finback.store.store import human_number

        rows.append(("parameters", human_number(int(count))))
    elif det.get("parameter_size"):
        rows.append(("parameters", det["parameter_size"]))
    ctx = mi.get(f"{arch}.context_length") or mi.get("max_position_embeddings")
    if ctx:
        rows.append(("context length", str(ctx)))
    emb = mi.get(f"{arch}.embedding_length") or mi.get("hidden_size")
    if emb:
        rows.append(("embedding length", str(emb)))
    if det.get("quantization_level"):
        rows.append(("quantization", det["quantization_level"]))
    out = ["  Model"] + [f"    {k:<20}{v}" for k, v in rows] + [""]
    caps = info.get("capabilities") or []
    if caps:
        out += ["  Capabilities"] + [f"    {c}" for c in caps] + [""]
    params = [ln for ln in (info.get("parameters") or "").splitlines() if ln.strip()]
    if params:
        out.append("  Parameters")
        for ln in params:
            k, _, v = ln.partition(" ")
            out.append(f"    {k:<20}{v.strip()}")
        out.append("")
    if info.get("system"):
        out.append("  System")
        sys_lines = info["system"].strip().splitlines()
        out += [f"    {ln}" for ln in sys_lines[:2]] + (["    ..."] if len(sys_lines) > 2 else []) + [""]
    lic = (info.get("license") or "").strip()
    if lic:
        out.append("  License")
        lines = [ln for ln in lic.splitlines() if ln.strip()]
        out += [f"    {ln.strip()}" for ln in lines[:2]] + (["    ..."] if len(lines) > 2 else []) + [""]
    return "\n".join(out)


def show(client: Client, name: str, what: str | None) -> None:
    info = show_info(client, name)
    if what is None:
        print(summary(info))
    elif what == "modelfile":
        sys.stdout.write(_modelfile_text(info, name))
    else:
        text = info.get(what) or ""
        print(text)


def _modelfile_text(info: dict, name: str) -> str:
    text = info.get("modelfile") or ""
    if not text.startswith("#"):
        header = ('# Modelfile generated by "ollama show"\n'
                  "# To build a new Modelfile based on this, replace FROM with:\n"
                  f"# FROM {name}\n\n")
        text = header + text
    return text if text.endswith("\n") else text + "\n"


# ---------------------------------------------------------------------------------------- create

_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def _model_files(path: str) -> dict[str, str]:
    """file name -> local path of what `FROM path` brings: a GGUF (every shard of a split set)
    or a safetensors folder's weights and side files."""
    if os.path.isdir(path):
        from finback.store.store import _SIDE_FILES

        files = {e: os.path.join(path, e) for e in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, e)) and not e.startswith(".")
                 and (e.endswith(".safetensors") or e in _SIDE_FILES)}
        if not any(f.endswith(".safetensors") for f in files) or "config.json" not in files:
            raise CLIError(f"{path}: not a model folder (needs config.json and *.safetensors)")
        return files
    base = os.path.basename(path)
    m = _SPLIT_RE.match(base)
    if m:
        n = int(m.group("n"))
        folder = os.path.dirname(path)
        files = {}
        for i in range(1, n + 1):
            f = f"{m.group('stem')}-{i:05d}-of-{m.group('n')}.gguf"
            if not os.path.isfile(os.path.join(folder, f)):
                raise CLIError(f"{path}: shard {f} is missing")
            files[f] = os.path.join(folder, f)
        return files
    name = base if base.endswith(".gguf") else base + ".gguf"
    return {name: path}


def _sha256(path: str, progress=None, task=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            h.update(chunk)
            if progress is not None:
                progress.advance(task, len(chunk))
    return "sha256:" + h.hexdigest()


class _UploadReader:
    def __init__(self, f, progress, task):
        self.f, self.progress, self.task = f, progress, task

    def read(self, n=-1):
        data = self.f.read(n if n and n > 0 else 1 << 20)
        if data:
            self.progress.advance(self.task, len(data))
        return data


def _upload(client: Client, files: dict[str, str]) -> dict[str, str]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    console = _err_console()
    digests = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
                  console=console) as progress:
        for fname, path in files.items():
            size = os.path.getsize(path)
            task = progress.add_task(f"gathering model components: {fname}", total=size)
            digest = _sha256(path, progress, task)
            digests[fname] = digest
            try:
                client.json("HEAD", f"/api/blobs/{digest}")
                progress.update(task, description=f"using existing layer {digest[7:19]}")
                continue
            except APIStatusError as exc:
                if exc.status != 404:
                    raise
            progress.update(task, description=f"copying file {digest[7:19]}", completed=0)
            with open(path, "rb") as f:
                with client._request("POST", f"/api/blobs/{digest}", data=_UploadReader(f, progress, task),
                                     headers={"Content-Length": str(size),
                                              "Content-Type": "application/octet-stream"}) as resp:
                    resp.read()
    return digests


def create(client: Client, name: str, modelfile_path: str | None) -> None:
    from finback.store.modelfile import ModelfileError, parse_modelfile

    path = modelfile_path or "Modelfile"
    if modelfile_path is None and not os.path.exists(path):
        raise CLIError("no Modelfile here: give one with -f")
    try:
        with open(path, "rb") as f:
            mf = parse_modelfile(f.read())
    except FileNotFoundError:
        raise CLIError(f"open {path}: no such file or directory") from None
    except ModelfileError as exc:
        raise CLIError(f"{path} {exc}") from None
    req: dict[str, Any] = {"model": name, "stream": True}
    src = os.path.expanduser(mf.from_)
    if not os.path.isabs(src):
        src = os.path.join(os.path.dirname(os.path.abspath(path)), src)
    if os.path.exists(src):
        req["files"] = _upload(client, _model_files(src))
    elif os.sep in mf.from_ and mf.from_.startswith((".", "/", "~")):
        raise CLIError(f"{mf.from_}: no such file or directory")
    else:
        req["from"] = mf.from_
    if mf.template is not None:
        req["template"] = mf.template
    if mf.system is not None:
        req["system"] = mf.system
    if mf.parameters:
        req["parameters"] = mf.parameters
    if mf.messages:
        req["messages"] = mf.messages
    if mf.license:
        req["license"] = mf.license if len(mf.license) > 1 else mf.license[0]
    console = _err_console()
    with client.stream("/api/create", req) as stream:
        for item in stream:
            if item.get("status"):
                console.print(item["status"], markup=False)


# ---------------------------------------------------------------------------------------- rm / cp / stop

def rm(client: Client, names: list[str]) -> None:
    for name in names:
        # unload first, as Ollama does, so the engine lets go of the files
        client.json("DELETE", "/api/delete", {"model": name})
        print(f"deleted '{name}'")


def cp(client: Client, src: str, dst: str) -> None:
    client.json("POST", "/api/copy", {"source": src, "destination": dst})
    print(f"copied '{src}' to '{dst}'")


def _same_model(running: str, name: str) -> bool:
    if running == name:
        return True
    if os.path.exists(name):
        return running == os.path.abspath(name)
    tail = name.rsplit("/", 1)[-1]
    full = name if ":" in tail else name + ":latest"
    return running in (full, full.removesuffix(":latest"))


def stop(client: Client, name: str) -> None:
    running = [m.get("name") or m.get("model") for m in client.json("GET", "/api/ps").get("models") or []]
    match = next((r for r in running if r and _same_model(r, name)), None)
    if match is None:
        try:
            show_info(client, name)
        except APIStatusError as exc:
            if exc.status == 404:
                raise CLIError(f"couldn't find model \"{name}\" to stop") from None
            raise
        return  # known but not loaded: nothing to stop
    client.json("POST", "/api/generate", {"model": match, "keep_alive": 0})
