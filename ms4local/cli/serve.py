"""`ms4local serve`: an OpenAI-compatible server (declares the options, hands off to ms4local.server).

With `--rpc` the model is served by a child process behind ms4local.server.front, which keeps the
address answering (503 and the reason) while an rpc-server is lost, and loads the model again
once it is back: llama.cpp aborts the process its RPC client runs in.
"""

from __future__ import annotations

import os
from dataclasses import replace
from subprocess import Popen
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from quantize.units import parse_size

from .. import ui
from ..engine import Engine, Sampling
from ..child import Child, in_child
from ..rpc import Endpoint, parse_endpoints, preflight
from . import options
from .errors import fail, handle_errors

FRONT_ENV = "MS4LOCAL_SERVE_FRONT"  # for the engine process behind the front: the URL clients use


@handle_errors
@options.from_hub(projector=True)
@options.engine_flags
def serve(
    model: options.Model,
    host: Annotated[str, typer.Option("--host", help="Address to bind (a public one needs --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MS4LOCAL_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' (also from $MS4LOCAL_API_KEY, which keeps it out of `ps`).")] = None,
    alias: Annotated[Optional[str], typer.Option(
        "--alias", show_default=False, help="Model id clients use (default: the file name without .gguf).")] = None,
    parallel: Annotated[int, typer.Option(
        "-np", "--parallel", help="Conversations decoded together in one batch; each gets ctx-size/N tokens.")] = 1,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait when every slot is busy (0: none wait, up to --parallel "
                            "are served at once); more get 429 with Retry-After.")] = 64,
    max_body_size: Annotated[str, typer.Option(
        "--max-body-size", metavar="SIZE", callback=options.size_flag, help="Largest request body (images come as data: URIs); more gets 413.")] = "32M",
    allow_image_urls: Annotated[bool, typer.Option(
        "--allow-image-urls", help="Fetch http(s):// image URLs (off: only data: URIs are read).")] = False,
    allow_local_files: Annotated[bool, typer.Option(
        "--allow-local-files", help="Read file:// image URLs from this machine's disk (off by default).")] = False,
    reasoning_effort: Annotated[str, typer.Option(
        "--reasoning-effort", help="Effort when a request names none: none or high.")] = "none",
    max_tokens: Annotated[int, typer.Option(
        "-n", "--max-tokens", help="Most tokens per answer when a request sets no max_tokens.")] = 2048,
    temp: options.Temp = None,
    top_p: options.TopP = options.SAMPLING.top_p,
    top_k: options.TopK = options.SAMPLING.top_k,
    min_p: options.MinP = options.SAMPLING.min_p,
    repeat_penalty: options.RepeatPenalty = options.SAMPLING.repeat_penalty,
    *,
    flags: dict[str, Any],
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    # Every flag as the command line gave it, for the engine process behind the front (--rpc).
    arguments = {**{k: v for k, v in locals().items() if k != "flags"}, **flags}
    try:
        from ..server import ImagePolicy, ServerConfig, is_loopback
        from ..server import serve as run
    except ImportError as e:
        raise fail(f"the server needs its extra dependencies ({e.name or e}): pip install 'ms4local[server]'") from None
    options.check_reasoning_effort(reasoning_effort)
    if max_queue < 0 or max_tokens < 1 or not 0 < port < 65536:
        raise fail("--max-queue must be 0 or more, -n at least 1 and --port within 1-65535", 2)
    opts = replace(options.engine_options(**flags), parallel=parallel)
    opts.check()
    sampling = Sampling(top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, max_tokens=max_tokens)
    config = ServerConfig(
        model_id=alias or Path(model).name.removesuffix(".gguf"), api_key=api_key,
        reasoning_effort=reasoning_effort, temperature_by_effort=temp is None,
        sampling=sampling if temp is None else replace(sampling, temperature=temp),
        images=ImagePolicy(allow_urls=allow_image_urls, allow_local_files=allow_local_files),
        max_body_bytes=parse_size(max_body_size))
    config.check()  # an empty --api-key, or defaults that every request would be refused for
    if not Path(model).is_file():
        raise fail(f"model file {model} does not exist", 1)
    if not is_loopback(host) and not api_key:
        ui.err.print(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
                     "model", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if opts.rpc and not in_child():
        endpoints = parse_endpoints(opts.rpc)
        preflight(endpoints)  # an unusable rpc-server is one line now, not a child that dies at load
        code = serve_behind_front(arguments, endpoints, host=host, port=port)
        if code:
            raise typer.Exit(code)
        return
    placement = options.resolve_placement(model, opts)
    run(lambda: Engine(model, opts, placement=placement), config, host=host, port=port, max_queue=max_queue,
        public_url=os.environ.get(FRONT_ENV))


def serve_behind_front(arguments: dict[str, object], endpoints: list[Endpoint], *, host: str, port: int) -> int:
    """Hold host:port with ms4local.server.front and serve the model from a child `serve` on a
    private loopback port, started again whenever an rpc-server is lost and back; the exit code."""
    from ..server.front import EngineProcess, run_front

    public = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    children: list[Child] = []

    def start(child_port: int) -> Popen[bytes]:
        for old in children:
            old.close()
        kwargs = {**arguments, "host": "127.0.0.1", "port": child_port}
        children[:] = [Child(serve, kwargs, env={FRONT_ENV: public}, own_group=True)]
        return children[0].proc

    def say(text: str) -> None:
        ui.err.print(text, markup=False, highlight=False, soft_wrap=True)

    def describe(code: int) -> str:
        return children[0].death(code, endpoints, "The model is loaded again once every rpc-server answers")

    engine = EngineProcess(start=start, endpoints=endpoints, describe_death=describe, log=say)
    try:
        return run_front(engine, host=host, port=port, public=public)
    finally:
        for child in children:
            child.close()
