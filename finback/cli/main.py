"""The `finback` command: `serve`, and the client commands Ollama's users know (run, pull, list,
ps, show, create, rm, cp, stop), which talk to the server over Ollama's API.

When no server answers at FINBACK_HOST / OLLAMA_HOST (default 127.0.0.1:11434), a client command
starts `finback serve` in the background (a detached process whose log is
~/.finback/logs/server.log, or logs/server.log beside FINBACK_MODELS) and waits for it, so every
terminal shares one server and one engine. `run PATH` (a GGUF file or a safetensors folder) goes
through the server too: the absolute path is the model's name, which the server opens directly.

Errors are one line on stderr (`Error: ...`) and exit status 1.
"""

from __future__ import annotations

import argparse
import sys

ENGINE_FLAGS = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                "seed", "kv_cache_space_gb", "tensor_parallel_size", "gpu_memory_utilization",
                "pipeline_parallel_size", "distributed_executor_backend")


def _engine_args(ns) -> dict:
    out = {}
    for name in ENGINE_FLAGS:
        value = getattr(ns, name, None)
        if value is not None:
            out[name] = value
    if getattr(ns, "no_prefix_caching", False):
        out["enable_prefix_caching"] = False
    if getattr(ns, "enforce_eager", False):
        out["enforce_eager"] = True
    if getattr(ns, "async_scheduling", None) is not None:
        out["async_scheduling"] = ns.async_scheduling
    return out


def _serve_argv(ns) -> list[str]:
    """The engine flags given to a client command, for the server it may start."""
    argv = []
    for name in ENGINE_FLAGS:
        value = getattr(ns, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    if getattr(ns, "no_prefix_caching", False):
        argv.append("--no-prefix-caching")
    if getattr(ns, "enforce_eager", False):
        argv.append("--enforce-eager")
    if getattr(ns, "async_scheduling", None) is not None:
        argv.append("--async-scheduling" if ns.async_scheduling else "--no-async-scheduling")
    return argv


def _add_engine_flags(p: argparse.ArgumentParser, note: str = "") -> None:
    g = p.add_argument_group("engine (named as vLLM names them)" + note)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--kv-cache-space-gb", type=float)
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--pipeline-parallel-size", type=int)
    g.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                   help="worker processes on this machine (mp, the default) or Ray actors on the cluster at "
                        "RAY_ADDRESS (ray)")
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before reading the last one's tokens (default: on for one GPU)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (sent as Ollama options; unset: the model's PARAMETERs)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--max-tokens", type=int, help="num_predict")
    g.add_argument("--num-ctx", type=int)
    g.add_argument("--sampling-seed", type=int, help="seed")
    g.add_argument("--stop", action="append")
    g.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="any Ollama option")


# ------------------------------------------------------------------------------------ commands

def cmd_serve(ns) -> int:
    import logging

    from finback.server.app import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = {}
    if ns.api_key:
        kwargs["api_keys"] = ns.api_key
    if ns.max_concurrent_requests:
        kwargs["max_concurrent_requests"] = ns.max_concurrent_requests
    if ns.max_request_body:
        kwargs["max_body_bytes"] = ns.max_request_body
    serve(host=ns.host, port=ns.port, engine_kwargs=_engine_args(ns), **kwargs)
    return 0


def _client(ns):
    from finback.cli.client import Client

    client = Client()
    client.ensure_server(_serve_argv(ns))
    return client


def cmd_run(ns) -> int:
    from finback.cli.run import start

    return start(_client(ns), ns)


def cmd_generate(ns) -> int:
    from finback.cli import fmt
    from finback.cli.run import options_from_flags

    client = _client(ns)
    req = {"model": ns.model, "prompt": ns.prompt, "raw": True, "stream": True}
    opts = options_from_flags(ns)
    if opts:
        req["options"] = opts
    final = None
    with client.stream("/api/generate", req) as stream:
        try:
            for item in stream:
                sys.stdout.write(item.get("response") or "")
                sys.stdout.flush()
                if item.get("done"):
                    final = item
        except KeyboardInterrupt:
            pass
    print()
    if ns.verbose and final:
        fmt.print_stats(final)
    return 0


def cmd_pull(ns) -> int:
    from finback.cli import commands

    commands.pull(_client(ns), ns.model)
    return 0


def cmd_list(ns) -> int:
    from finback.cli import commands

    commands.list_models(_client(ns))
    return 0


def cmd_ps(ns) -> int:
    from finback.cli import commands

    commands.ps(_client(ns))
    return 0


def cmd_show(ns) -> int:
    from finback.cli import commands

    what = None
    for flag in ("modelfile", "template", "parameters", "system", "license"):
        if getattr(ns, flag):
            if what is not None:
                from finback.cli.client import CLIError

                raise CLIError("only one of --license, --modelfile, --parameters, --system, or --template "
                               "can be specified")
            what = flag
    commands.show(_client(ns), ns.model, what)
    return 0


def cmd_create(ns) -> int:
    from finback.cli import commands

    commands.create(_client(ns), ns.model, ns.file)
    return 0


def cmd_rm(ns) -> int:
    from finback.cli import commands

    commands.rm(_client(ns), ns.models)
    return 0


def cmd_cp(ns) -> int:
    from finback.cli import commands

    commands.cp(_client(ns), ns.source, ns.destination)
    return 0


def cmd_stop(ns) -> int:
    from finback.cli import commands

    commands.stop(_client(ns), ns.model)
    return 0


# ------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    from finback import __version__
    from finback.store.resolve import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="finback", description="Run the DeepSeek-R1 family on your own hardware.")
    parser.add_argument("--version", "-v", action="version", version=f"finback {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="start the server (FINBACK_HOST / OLLAMA_HOST, default 127.0.0.1:11434)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require this key (comma-separated: several); default FINBACK_API_KEY")
    p.add_argument("--max-concurrent-requests", type=int,
                   help="generation requests in flight before 503 + Retry-After (default 256)")
    p.add_argument("--max-request-body", type=int, help="largest JSON request body in bytes (default 16 MiB)")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="chat with a model (one answer if a prompt is given, else a REPL)")
    p.add_argument("model", help=f"model name (the embedded default: {DEFAULT_MODEL}), GGUF file or "
                                 f"safetensors folder")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--system", help="system message")
    p.add_argument("--verbose", action="store_true", help="print timings after each answer")
    p.add_argument("--think", dest="think", action="store_const", const=True, default=None,
                   help="ask for reasoning (default: on for models that think)")
    p.add_argument("--nothink", "--no-think", dest="think", action="store_const", const=False,
                   help="skip the reasoning")
    p.add_argument("--hidethinking", action="store_true", help="do not print the reasoning")
    p.add_argument("--keepalive", help="how long the model stays loaded (e.g. 5m, 1h, -1)")
    p.add_argument("--nowordwrap", action="store_true", help=argparse.SUPPRESS)
    _add_sampling_flags(p)
    _add_engine_flags(p, ": used if this command starts the server")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pull", help="pull a model into the store")
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", aliases=["ls"], help="list models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("ps", help="list running models")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("show", help="show information for a model")
    p.add_argument("model")
    for flag in ("modelfile", "template", "parameters", "system", "license"):
        p.add_argument(f"--{flag}", action="store_true", help=f"show the model's {flag}")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("create", help="create a model from a Modelfile")
    p.add_argument("model")
    p.add_argument("-f", "--file", help="the Modelfile (default: ./Modelfile)")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("rm", help="remove models")
    p.add_argument("models", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("cp", help="copy a model")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("stop", help="stop (unload) a running model")
    p.add_argument("model")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--verbose", action="store_true")
    _add_sampling_flags(p)
    _add_engine_flags(p, ": used if this command starts the server")
    p.set_defaults(func=cmd_generate)

    from finback.cli.bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    from finback.cli.doctor import add_parser as add_doctor_parser
    from finback.cli.fit import add_parser as add_fit_parser

    add_fit_parser(sub)
    add_doctor_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from finback.cli.client import CLIError

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except CLIError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError) as exc:  # bad values, files: one line, no traceback
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
