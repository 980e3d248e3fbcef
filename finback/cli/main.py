"""The `finback` command."""

from __future__ import annotations

import argparse
import sys
import time

from finback.store.resolve import DEFAULT_MODEL


def _engine_args(ns) -> dict:
    out = {}
    for name in ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "seed", "kv_cache_space_gb", "tensor_parallel_size", "gpu_memory_utilization"):
        value = getattr(ns, name, None)
        if value is not None:
            out[name] = value
    if getattr(ns, "no_prefix_caching", False):
        out["enable_prefix_caching"] = False
    return out


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (named as vLLM names them)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--kv-cache-space-gb", type=float)
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--no-prefix-caching", action="store_true")


def _sampling(ns):
    from finback.engine.sampling import SamplingParams

    return SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.sampling_seed,
                          max_tokens=ns.max_tokens, stop=ns.stop or None)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--sampling-seed", type=int)
    g.add_argument("--stop", action="append")
    p.add_argument("--verbose", action="store_true", help="print Ollama's timing statistics after each answer")


def _stream(engine, ids, params, prompt_text=None) -> "RequestOutput":
    rid = f"cli-{time.monotonic_ns()}"
    engine.add_request(rid, ids, params, prompt=prompt_text)
    last = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    sys.stdout.write(out.outputs[0].new_text)
                    sys.stdout.flush()
                    last = out
    except KeyboardInterrupt:
        engine.abort_request(rid)
        print()
        return last
    print()
    return last


def _print_stats(out, load_ns: int) -> None:
    def dur(ns):
        return f"{ns / 1e9:.6f}s" if ns >= 1e9 else f"{ns / 1e6:.4f}ms"

    pe, ev = out.prompt_eval_duration, out.eval_duration
    print(f"total duration:       {dur(out.total_duration + load_ns)}", file=sys.stderr)
    print(f"load duration:        {dur(load_ns)}", file=sys.stderr)
    print(f"prompt eval count:    {out.prompt_eval_count} token(s)", file=sys.stderr)
    print(f"prompt eval duration: {dur(pe)}", file=sys.stderr)
    if pe:
        print(f"prompt eval rate:     {out.prompt_eval_count / (pe / 1e9):.2f} tokens/s", file=sys.stderr)
    print(f"eval count:           {out.eval_count} token(s)", file=sys.stderr)
    print(f"eval duration:        {dur(ev)}", file=sys.stderr)
    if ev and out.eval_count > 1:
        print(f"eval rate:            {(out.eval_count - 1) / (ev / 1e9):.2f} tokens/s", file=sys.stderr)


def cmd_run(ns) -> int:
    from finback.engine.llm import LLM
    from finback.prompt.template import ChatTemplate

    llm = LLM(ns.model, **_engine_args(ns))
    engine, tok = llm.engine, llm.get_tokenizer()
    if not tok.chat_template:
        print(f"error: model {ns.model} has no chat template; use `finback generate`", file=sys.stderr)
        return 1
    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    params = _sampling(ns)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    load_ns = engine.load_duration_ns

    def turn(text: str) -> None:
        nonlocal load_ns
        messages.append({"role": "user", "content": text})
        prompt = template.render(messages, add_generation_prompt=True)
        out = _stream(engine, tok.encode(prompt), params, prompt)
        if out is not None:
            messages.append({"role": "assistant", "content": out.outputs[0].text})
            if ns.verbose:
                _print_stats(out, load_ns)
        load_ns = 0

    if ns.prompt:
        turn(" ".join(ns.prompt))
        return 0
    print(">>> Send a message (/bye to exit, /set verbose to show statistics)", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/bye", "/exit"):
            return 0
        if line.strip() == "/set verbose":
            ns.verbose = True
            continue
        if line.strip() == "/set quiet":
            ns.verbose = False
            continue
        turn(line)


def cmd_generate(ns) -> int:
    from finback.engine.llm import LLM

    llm = LLM(ns.model, **_engine_args(ns))
    tok = llm.get_tokenizer()
    out = _stream(llm.engine, tok.encode(ns.prompt, add_special_tokens=True), _sampling(ns), ns.prompt)
    if ns.verbose and out is not None:
        _print_stats(out, llm.engine.load_duration_ns)
    return 0


def cmd_serve(ns) -> int:
    import logging

    from finback.server.app import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(host=ns.host, port=ns.port, engine_kwargs=_engine_args(ns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from finback import __version__

    parser = argparse.ArgumentParser(prog="finback", description="Run the DeepSeek-R1 family on your own hardware.")
    parser.add_argument("--version", action="version", version=f"finback {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="chat with a model (one-shot if a prompt is given)")
    p.add_argument("model", help=f"model name (the embedded default: {DEFAULT_MODEL}), GGUF file or "
                                 f"safetensors folder")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--system")
    _add_sampling_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve Ollama's API (default 127.0.0.1:11434; FINBACK_HOST / OLLAMA_HOST)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    _add_sampling_flags(p)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, OSError) as exc:  # bad model, bad flag values: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
