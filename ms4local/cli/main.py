"""The `ms4local` Typer app: registers one thin module per command."""

from __future__ import annotations

import sys
import warnings

import typer

from ..errors import Ms4localNotice
from . import chat, demo, doctor, eval, info, pull, quantize, rm, rpc_server, serve, tokenize
from .list import list_models

_show_warning = warnings.showwarning


def _show_notice(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    """The library's notices as one `note:` line on stderr; other warnings as Python shows them."""
    if issubclass(category, Ms4localNotice):
        print(f"note: {message}", file=sys.stderr, flush=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_notice

app = typer.Typer(
    name="ms4local",
    help="Run Mistral Small 4 locally: convert and quantize to GGUF, chat, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize")(quantize.quantize_command)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.command("tokenize")(tokenize.tokenize)
app.command("demo")(demo.demo)
app.command("doctor")(doctor.doctor)
app.command("info")(info.info)
app.command("eval")(eval.eval_command)
app.command("pull")(pull.pull)
app.command("list")(list_models)
app.command("rm")(rm.rm)
app.command("rpc-server")(rpc_server.rpc_server)

if __name__ == "__main__":
    app()
