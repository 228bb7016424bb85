"""Option types shared by several commands, declared once with llama.cpp's names.

The engine options (context, batches, KV cache, flash attention, GPU placement) come as a set:
a command declares the aliases it wants and hands the values to `engine_options(...)`, which
returns the one `EngineOptions` the engine takes. Before loading, `resolve_placement` prints
what the user must know (a GPU flag that does nothing here, the --fit plan as a table). The
checks of flags that several commands share (`check_text`, `check_reasoning_effort`,
`max_tokens`) raise OptionsError, which the error table turns into one line and exit code 2.

The model argument (`Model`, and quantize's `Source`) takes a path or a Hugging Face name,
`org/repo[:QUANT]`: its callback only checks the name's shape; `from_hub` is the one place a name
becomes a path (`fetch`: from the HF cache without the network, pulled with its plan and a byte
bar when missing), in the command's body, so every other flag is checked before a byte is fetched
and --mmproj/--no-mmproj decide whether the repo's projector is fetched at all.

`--rpc` (`Rpc`) is one of the engine flags; `isolate_rpc` runs a command given it in a child
process (ms4local/child.py), where llama.cpp's abort on a lost rpc-server cannot reach the user.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

from rich.markup import escape
from rich.table import Table

from quantize.units import parse_size

from .. import child, hub, ui
from ..engine import EngineOptions, Placement, Sampling, place
from ..errors import OptionsError
from ..prompt import REASONING_EFFORTS
from ..rpc import parse_endpoints, preflight
from .errors import handle_errors

# The sampling flags' defaults are the engine's own, written once in `Sampling` (read, never changed).
SAMPLING = Sampling()

F = TypeVar("F", bound=Callable[..., Any])


def isolate_rpc(func: F) -> F:
    """With `--rpc`, run the command in a child process (ms4local/child.py): llama.cpp aborts the
    process its RPC client runs in when a server is lost. The endpoints are probed here first, so
    an unusable one is its one line before anything starts; a child that dies is an RpcError naming
    the lost server. Sits under `handle_errors`, which turns both into one line and exit 1.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        rpc = kwargs.get("rpc")
        if not rpc or child.in_child() or args:
            return func(*args, **kwargs)
        endpoints = parse_endpoints(rpc)
        preflight(endpoints)
        code = child.run(func, kwargs, endpoints)
        if code:
            raise typer.Exit(code)
        return None

    return wrapper  # type: ignore[return-value]


def from_hub(*, projector: bool) -> Callable[[F], F]:
    """Resolve a Hub name given as MODEL (a GGUF repo's quant) to its first file before the command
    runs: after every flag was parsed and checked, above `isolate_rpc` (the child gets a path).
    A command with --mmproj gets the repo's projector there unless --mmproj or --no-mmproj was given
    (a repo may keep it in another folder than the quant's); `projector` says whether a command
    without that flag wants it fetched (info shows it, tokenize has no use for it)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = hub.hub_name(kwargs["model"]) if kwargs.get("model") and not args else None
            if name is None:
                return func(*args, **kwargs)
            wants = kwargs.get("mmproj") is None and not kwargs.get("no_mmproj") if "mmproj" in kwargs else projector
            resolved = fetch(name, kind="gguf", mmproj=wants)
            kwargs = {**kwargs, "model": str(resolved.model)}
            if wants and "mmproj" in kwargs and resolved.mmproj is not None:
                kwargs["mmproj"] = str(resolved.mmproj)
            return func(**kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def source_from_hub(func: F) -> F:
    """quantize's SRC from a Hub name, after every flag was checked: a checkpoint repo made complete
    in the cache and passed on as its id (the converter finds it there offline and names the output
    after it); a GGUF repo name (to re-quantize) resolved to its first file."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = hub.hub_name(kwargs["src"]) if kwargs.get("src") and not args else None
        if name is not None:
            resolved = fetch(name, mmproj=False)
            kwargs = {**kwargs, "src": name.repo_id if resolved.kind == "checkpoint" else str(resolved.model)}
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def fetch(name: hub.HubName, *, mmproj: bool = True, kind: str | None = None, always: bool = False) -> hub.Resolved:
    """`name` from the Hugging Face cache (no network), or pulled first with the plan and a byte bar
    on stderr; `always` asks the Hub for the current files even when the cache has them (`pull`).
    Ctrl-C says how to resume."""
    run = hub.pull if always else hub.resolve
    try:
        with ui.byte_progress("download") as bar:
            return run(name, mmproj=mmproj, kind=kind, on_plan=show_pull_plan,
                       progress=lambda done, total, path: bar(done, total, path.rsplit("/", 1)[-1]))
    except KeyboardInterrupt:
        print(f"interrupted: run `ms4local pull {name}` to resume where it stopped", file=sys.stderr)
        raise


def show_pull_plan(plan: hub.PullPlan) -> None:
    """The files a pull fetches, their sizes and what the cache already has, on stderr."""
    ui.err.print(f"[bold]{escape(str(plan.name))}[/] from {escape(plan.selection.name.repo_id)} at commit "
                 f"{plan.revision[:12]}", soft_wrap=True)
    table = Table(header_style="bold")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("cache")
    for f in plan.files:
        state = ("in the cache" if f.path in plan.cached else
                 f"resume from {ui.human_bytes(plan.partial[f.path])}" if f.path in plan.partial else "")
        table.add_row(escape(f.path), ui.human_bytes(f.size), state)
    ui.err.print(table)
    ui.err.print(f"{len(plan.files)} files, {ui.human_bytes(plan.total)}; "
                 + (f"{ui.human_bytes(plan.to_fetch)} to download" if plan.to_fetch else "all in the cache"),
                 soft_wrap=True)


@handle_errors
def _hub_name_shape(ctx: typer.Context, value: str) -> str:
    """MODEL and SRC as given; a Hub name of a malformed shape is refused here, at parse time (the
    name is resolved by `from_hub` / `source_from_hub` once all flags are checked)."""
    if not ctx.resilient_parsing:
        hub.hub_name(value)
    return value


@handle_errors
def size_flag(ctx: typer.Context, value: str | None) -> str | None:
    """A SIZE flag (--vram, --ram, --max-body-size, --split-max-size) checked at parse time, so a
    typo is its one line before a Hub name is fetched; kept as written ("0" is no GPU for --vram)."""
    if value is not None and not ctx.resilient_parsing and value.strip().upper() not in ("0", "0G", "0B"):
        parse_size(value)
    return value


Model = Annotated[str, typer.Argument(
    help="A GGUF file (the first file of a split set), or org/repo[:QUANT] on the Hugging Face Hub "
         "(from its cache; downloaded first when missing).", show_default=False, callback=_hub_name_shape)]
Source = Annotated[str, typer.Argument(
    help="Checkpoint directory, a .gguf file to re-quantize, or org/repo on the Hugging Face Hub (a safetensors "
         "checkpoint, or org/repo:QUANT of a GGUF repo; from its cache, downloaded first when missing).",
    show_default=False, callback=_hub_name_shape)]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: random).")]
Temp = Annotated[Optional[float], typer.Option("--temp", help="Temperature (default 0.7 with high effort, 0.1 with none).")]
MaxTokens = Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens to generate (-1: until the context is full).")]
ReasoningEffort = Annotated[str, typer.Option("--reasoning-effort", help="none: answer directly; high: think first.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the K most likely tokens (0: all).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than this fraction of the best one.")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", help="Penalise the last 64 tokens (1.0: off).")]

# ----------------------------------------------------------------------------- engine options
CtxSize = Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")]
Threads = Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads (default: all cores).")]
BatchSize = Annotated[int, typer.Option("-b", "--batch-size", help="Prompt tokens handed to llama.cpp per call.")]
UbatchSize = Annotated[int, typer.Option(
    "-ub", "--ubatch-size", help="Tokens computed at once (the compute buffers grow with it).")]
FlashAttn = Annotated[str, typer.Option("-fa", "--flash-attn", metavar="on|off|auto", help="Flash attention.")]
LoadMode = Annotated[str, typer.Option(
    "-lm", "--load-mode", metavar="auto|none|mmap|mlock|mmap+mlock|dio",
    help="How llama.cpp reads the weights: mapped from the file (mmap), read into RAM (none), locked in RAM (mlock).")]
CacheTypeK = Annotated[str, typer.Option(
    "-ctk", "--cache-type-k", help="KV cache type: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl. "
                                   "Mistral 4's MLA cache needs -ctv equal to it.")]
CacheTypeV = Annotated[str, typer.Option(
    "-ctv", "--cache-type-v", help="V cache type; must equal -ctk for MLA (quantized needs flash attention).")]
NGpuLayers = Annotated[Optional[str], typer.Option(
    "-ngl", "--n-gpu-layers", metavar="N|all", show_default=False,
    help="Layers on the GPU (llama.cpp counts the output layer first). Default: all when a GPU is present.")]
CpuMoe = Annotated[bool, typer.Option(
    "--cpu-moe", help="Keep every routed expert in RAM (attention and shared experts stay on the GPU).")]
NCpuMoe = Annotated[int, typer.Option("--n-cpu-moe", metavar="N", help="Keep the routed experts of blocks 0..N-1 in RAM.")]
OverrideTensor = Annotated[Optional[list[str]], typer.Option(
    "-ot", "--override-tensor", metavar="REGEX=BUFT", show_default=False,
    help="Put tensors whose name matches REGEX in buffer type BUFT (CPU, CUDA0 …); repeatable, first match wins.")]
Fit = Annotated[Optional[bool], typer.Option(
    "--fit/--no-fit", show_default=False,
    help="Choose the GPU placement from free memory. Default: on when a GPU is present and nothing is placed by hand.")]
Vram = Annotated[Optional[str], typer.Option(
    "--vram", metavar="SIZE", show_default=False, callback=size_flag,
    help="Plan --fit for this much GPU memory (24G, 24GiB, 512M) instead of what the GPU reports free.")]

TensorSplit = Annotated[Optional[str], typer.Option(
    "-ts", "--tensor-split", metavar="N0,N1,…", show_default=False,
    help="Share of the offloaded layers per device, in llama.cpp's order: the --rpc servers' devices first, then "
         "the local GPUs (e.g. 3,1). Default: in proportion to free memory.")]
Rpc = Annotated[Optional[list[str]], typer.Option(
    "--rpc", metavar="HOST:PORT[,…]", show_default=False,
    help="llama.cpp rpc-servers (`ms4local rpc-server` on the other hosts) whose devices take layers like GPUs; "
         "repeatable or comma-separated. Unencrypted, unauthenticated: a private network or an SSH tunnel only.")]

# ----------------------------------------------------------------------------- images
Mmproj = Annotated[Optional[str], typer.Option(
    "--mmproj", metavar="PATH", show_default=False,
    help="Vision projector GGUF. Default: an mmproj-*.gguf beside the model made for it.")]
NoMmproj = Annotated[bool, typer.Option("--no-mmproj", help="Load no vision projector (text only, less memory).")]
NoRepair = Annotated[bool, typer.Option("--no-repair", help="Load a third-party GGUF as it is: no temperature keys set, no projector copy with its [IMG_BREAK] row (see README).")]
ImageMaxTokens = Annotated[int, typer.Option(
    "--image-max-tokens", metavar="N",
    help="Most merged patches per image (llama.cpp's default 1024 ≈ 896×896 px). The model was trained up to "
         "1540 px (55×55 = 3025): more keeps detail, costs context and prompt time.")]
ImagePath = Annotated[Optional[list[str]], typer.Option(
    "--image", metavar="PATH", show_default=False,
    help="Image for the (first) message: a PNG, JPEG, WebP, GIF or BMP file or a data: URI; repeatable.")]



def _flag(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


# The engine flags that `chat` and `serve` both take, in their --help order: declared here once and
# added to each command's signature by `engine_flags`; the names are `engine_options`' parameters.
ENGINE_FLAGS = (
    _flag("ctx_size", CtxSize, 4096), _flag("threads", Threads, None), _flag("batch_size", BatchSize, 512),
    _flag("ubatch_size", UbatchSize, 512), _flag("flash_attn", FlashAttn, "auto"), _flag("load_mode", LoadMode, "auto"),
    _flag("cache_type_k", CacheTypeK, "f16"), _flag("cache_type_v", CacheTypeV, "f16"),
    _flag("n_gpu_layers", NGpuLayers, None), _flag("cpu_moe", CpuMoe, False), _flag("n_cpu_moe", NCpuMoe, 0),
    _flag("override_tensor", OverrideTensor, None), _flag("tensor_split", TensorSplit, None), _flag("fit", Fit, None),
    _flag("vram", Vram, None), _flag("rpc", Rpc, None), _flag("mmproj", Mmproj, None),
    _flag("no_mmproj", NoMmproj, False), _flag("no_repair", NoRepair, False),
    _flag("image_max_tokens", ImageMaxTokens, 1024),
)


def engine_flags(func: F) -> F:
    """Give a command the engine flags (ENGINE_FLAGS) after its own parameters, and call it with
    their values gathered in one dict, `flags` (for `engine_options(**flags)`). Typer reads the
    signature set here; the decorators above this one (`from_hub`, `isolate_rpc`) still see every
    flag by its own name, and a child process gets the flags as the command line gave them."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "flags"]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = {p.name: kwargs.pop(p.name, p.default) for p in ENGINE_FLAGS}
        return func(*args, flags=flags, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + list(ENGINE_FLAGS))  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + list(ENGINE_FLAGS)}
    return wrapper  # type: ignore[return-value]

def check_text(**flags: str | None) -> None:
    """Raise OptionsError naming the first option whose text is not valid UTF-8.

    Python hands arguments that are not UTF-8 over as str with lone surrogates (`--prompt
    $'caf\\xe9'` gives 'caf\\udce9'), which every later step that encodes them would fail on. The
    keyword names the flag: check_text(**{"--prompt": prompt}).
    """
    for flag, value in flags.items():
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(value[e.start]) - 0xDC00 if 0xDC80 <= ord(value[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else f"{value[e.start]!a}"
            raise OptionsError(f"{flag} is not valid UTF-8 text ({what} at character {e.start + 1}); "
                               "pass text in UTF-8") from None


def check_reasoning_effort(effort: str) -> None:
    """Raise OptionsError unless --reasoning-effort is one the model knows (none, high)."""
    if effort not in REASONING_EFFORTS:
        raise OptionsError(f"--reasoning-effort must be {' or '.join(REASONING_EFFORTS)}, got {effort!r}")


UNTIL_FULL = 2**31 - 1  # -n -1: generation stops at the end of the context (which llama.cpp may pad above -c)


def max_tokens(n: int) -> int:
    """-n as llama.cpp reads it: a count, or -1 for "until the context is full"."""
    if n == -1:
        return UNTIL_FULL
    if n < 0:
        raise OptionsError(f"-n/--max-tokens must be a number of tokens or -1 (until the context is full), got {n}")
    return n


def parse_gpu_layers(value: str | int | None) -> int | None:
    """-ngl as llama.cpp reads it: a count, or `all` (also `-1`); None leaves it to the engine."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower()
    if text in ("all", "-1"):
        return -1
    if text.isdigit():
        return int(text)
    raise OptionsError(f"-ngl/--n-gpu-layers must be a number of layers or 'all', got {value!r}")


def parse_tensor_split(value: str | None) -> list[float]:
    """-ts as llama.cpp reads it: shares separated by commas or slashes ("3,1", "3/1")."""
    if not value:
        return []
    try:
        return [float(x) for x in value.replace("/", ",").split(",")]
    except ValueError:
        raise OptionsError(f"-ts/--tensor-split wants numbers separated by commas (e.g. 3,1), got {value!r}") from None


def engine_options(*, ctx_size: int = 4096, threads: int | None = None, batch_size: int = 512,
                   ubatch_size: int = 512, flash_attn: str = "auto", load_mode: str = "auto", cache_type_k: str = "f16",
                   cache_type_v: str = "f16", n_gpu_layers: str | int | None = None, cpu_moe: bool = False,
                   n_cpu_moe: int = 0, override_tensor: list[str] | None = None, fit: bool | None = None,
                   vram: str | int | None = None, mmproj: str | None = None, no_mmproj: bool = False,
                   image_max_tokens: int = 1024, no_repair: bool = False, tensor_split: str | None = None,
                   rpc: list[str] | None = None) -> EngineOptions:
    """The command-line engine flags as one checked `EngineOptions` (raises OptionsError/SizeError).

    Everything that can be judged without the model is judged here, so a typo fails before the
    load; the cache-type rules that depend on the model are checked by the engine from the GGUF
    header, still before llama.cpp loads a byte of weights.
    """
    opts = EngineOptions(
        ctx_size=ctx_size, threads=threads, batch_size=batch_size, ubatch_size=ubatch_size,
        flash_attn=flash_attn.strip().lower(), load_mode=load_mode.strip().lower(),
        type_k=cache_type_k.strip().lower(), type_v=cache_type_v.strip().lower(),
        n_gpu_layers=parse_gpu_layers(n_gpu_layers), cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe,
        override_tensor=list(override_tensor or []), fit=fit,
        vram=parse_size(vram) if isinstance(vram, str) else vram, mmproj=mmproj, no_mmproj=no_mmproj,
        image_max_tokens=image_max_tokens, repair=not no_repair, tensor_split=parse_tensor_split(tensor_split),
        rpc=[str(ep) for ep in parse_endpoints(rpc or [])])
    opts.check()
    return opts


def resolve_placement(model: str, opts: EngineOptions) -> Placement:
    """Resolve --fit and the GPU flags against this build's devices, and tell the user.

    Notices go to stderr, one line each; a --fit plan is printed as a table. Pass the result to
    `Engine(model, opts, placement=...)` so the model is loaded exactly as shown.
    """
    placement = place(model, opts)
    for notice in placement.notices:
        ui.err.print(f"note: {notice}", style="yellow", markup=False, highlight=False)
    if placement.plan is not None:
        ui.err.print(ui.placement_table(placement.plan, applied=placement.applied))
    if placement.spread is not None:
        ui.err.print(ui.spread_table(placement.spread))
    return placement

