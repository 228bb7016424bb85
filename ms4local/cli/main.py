"""The `ms4local` Typer app: registers one thin module per command."""

from __future__ import annotations

import typer

from . import chat, demo, doctor, eval, info, quantize, serve, tokenize

app = typer.Typer(
    name="ms4local",
    help="Run Mistral Small 4 locally: convert and quantize to GGUF, chat, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize")(quantize.quantize)
app.command("chat")(chat.chat)
app.command("serve")(serve.serve)
app.command("tokenize")(tokenize.tokenize)
app.command("demo")(demo.demo)
app.command("doctor")(doctor.doctor)
app.command("info")(info.info)
app.command("eval")(eval.eval_command)

if __name__ == "__main__":
    app()
