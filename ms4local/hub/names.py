"""Hub names (`org/repo[:QUANT]`) and the files of a repo that a name stands for.

Pure functions over a repo's file paths, so that the Hub's listing and the local cache are read by
the same rules. The rules are llama.cpp's `-hf` ones (common/download.cpp): the quant is matched
case-insensitively in the path, in a file name or a folder name, as a whole dash/dot/slash-separated
piece; a split set `NAME-00001-of-0000N.gguf` stands for all its parts; without a quant, Q4_K_M.
Unlike llama.cpp, a repo without Q4_K_M is an error that lists its quants instead of a silent pick.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from quantize.gguf_header import SPLIT

from ..errors import HubNameError, HubNotFoundError

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's default for `-hf org/repo`
# The vision projector to take when a repo has several: full precision first, as the projector is
# small (~0.8 GB for Mistral Small 4) and quantizing a vision tower costs more than it saves.
MMPROJ_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")

# Hub repo ids: `org/name`, letters, digits, `-`, `_`, `.` (huggingface_hub validates the rest).
_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<quant>[A-Za-z0-9][\w.-]*))?$")
# What a quant tag looks like at the end of a file name (`…-Q4_K_M`, `….IQ4_XS`, `…-bf16`): a type name
# starts with one of these and a digit; `…-2603` (a date) or `…-Instruct` is not a quant.
_TAG = re.compile(r"[-.](?P<tag>(?:IQ|Q|TQ|F|BF|MXFP|NVFP)[0-9][A-Z0-9_]*)$", re.IGNORECASE)
# GGUF files that are not a model to load (llama.cpp's gguf_filename_is_model).
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

# What `ms4local quantize` reads from an HF-format checkpoint (quantize/source.py, hparams.py,
# vocab.py, mmproj.py): the config, the tokenizer, the chat template, the image normalisation and
# the HF-format weights. Not `consolidated*.safetensors`, the native-format copy of the same
# weights the official repo also ships (it would double a 242 GB download), nor params.json.
CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json", "tokenizer_config.json",
                    "chat_template.jinja", "chat_template.json", "processor_config.json",
                    "preprocessor_config.json")
TOKENIZERS = ("tokenizer.json", "tekken.json")  # the first one the repo has (vocab.py's order)


@dataclass(frozen=True)
class HubName:
    """`org/repo` or `org/repo:QUANT`."""

    repo_id: str
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.quant is None else f"{self.repo_id}:{self.quant}"


def parse_name(text: str) -> HubName | None:
    """`org/repo[:QUANT]` as a HubName; None for text of another shape (a path, a file name)."""
    m = _NAME.match(text)
    if m is None or text.lower().endswith((".gguf", ".safetensors", ".json")):
        return None
    return HubName(m["repo"], m["quant"])


def require_name(text: str) -> HubName:
    """parse_name, or HubNameError saying what a name looks like."""
    name = parse_name(text)
    if name is None:
        raise HubNameError(f"{text!r} is not a Hugging Face model name; expected org/repo or org/repo:QUANT "
                           "(e.g. unsloth/Mistral-Small-4-119B-2603-GGUF:Q4_K_M)")
    return name


@dataclass(frozen=True)
class Selection:
    """The files of a repo that a name stands for.

    `files` are the model: every part of a GGUF split set in order, or a checkpoint's files.
    `mmproj` is the vision projector chosen beside a GGUF model (None: none wanted or none there).
    """

    name: HubName  # for a GGUF repo with the quant explicit and upper case (the default filled in)
    kind: str  # "gguf" or "checkpoint"
    files: tuple[str, ...]
    mmproj: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file, the projector first: a model found complete in the cache then implies its
        projector is there too (see resolve.py), so a cached name resolves without the network."""
        return ((self.mmproj,) if self.mmproj else ()) + self.files


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_model_gguf(path: str) -> bool:
    """A GGUF that is a model (not a projector, an importance matrix or a draft head)."""
    base = _base(path).lower()
    return base.endswith(".gguf") and not any(k in base for k in _NOT_MODELS)


def is_mmproj(path: str) -> bool:
    base = _base(path).lower()
    return base.endswith(".gguf") and "mmproj" in base


def split_parts(path: str) -> tuple[str, ...]:
    """Every part of the split set `path` belongs to (just `path` when it is not split)."""
    m = SPLIT.match(path)
    if m is None:
        return (path,)
    count = int(m["count"])
    return tuple(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))


def _is_first(path: str) -> bool:
    m = SPLIT.match(path)
    return m is None or int(m["no"]) == 1


def quant_of(path: str) -> str | None:
    """The quant tag a GGUF's name ends with, upper case (`…-q4_k_m-00001-of-00002.gguf` → Q4_K_M)."""
    m = SPLIT.match(path)
    stem = m["prefix"] if m else path[: -len(".gguf")] if path.lower().endswith(".gguf") else path
    t = _TAG.search(stem)
    return t["tag"].upper() if t else None


def _matches(path: str, quant: str) -> bool:
    return re.search(rf"(?:^|[/._-]){re.escape(quant)}(?=[./-])", path, re.IGNORECASE) is not None


def quants(paths: Iterable[str]) -> list[str]:
    """The quants of the model GGUFs among `paths`, each once, sorted."""
    return sorted({q for p in paths if is_model_gguf(p) and _is_first(p) and (q := quant_of(p))})


def is_checkpoint_weight(path: str) -> bool:
    """An HF-format safetensors shard at the top of the repo (not the native `consolidated*` copy)."""
    return "/" not in path and path.endswith(".safetensors") and not path.startswith("consolidated")


def checkpoint_files(paths: Iterable[str]) -> tuple[str, ...]:
    """The files of an HF-format checkpoint that `ms4local quantize` reads: config.json first, the
    index and the other small files, then the weights. A cached copy with its index is complete
    exactly when every shard the index names is there (cache.checkpoint_complete)."""
    paths = sorted(set(paths))
    tokenizer = next((t for t in TOKENIZERS if t in paths), None)
    keep = {*CHECKPOINT_FILES, *([tokenizer] if tokenizer else [])}
    chosen = [p for p in paths if p in keep or is_checkpoint_weight(p)]
    return tuple(sorted(chosen, key=lambda p: (p != "config.json", is_checkpoint_weight(p), p)))


def is_checkpoint(paths: Iterable[str]) -> bool:
    paths = set(paths)
    return "config.json" in paths and any(is_checkpoint_weight(p) for p in paths)


def find_model(paths: Iterable[str], quant: str) -> str | None:
    """The first file of the model GGUF matching `quant`, or None. An exact tag beats a partial
    match (`Q4_K_M` picks `…-Q4_K_M.gguf` over `…-UD-Q4_K_M_XL.gguf`), then the path order."""
    found = [p for p in paths if is_model_gguf(p) and _is_first(p) and _matches(p, quant)]
    if not found:
        return None
    return min(found, key=lambda p: (quant_of(p) != quant.upper(), p.count("/"), p))


def find_mmproj(paths: Iterable[str], model: str) -> str | None:
    """The projector for `model`: one in the model's folder or a folder above it (the nearest
    wins, as in llama.cpp), then F16 before BF16, F32, Q8_0 and the rest."""
    model_dir = model.split("/")[:-1]
    best: tuple[tuple[int, int, str], str] | None = None
    for p in paths:
        if not is_mmproj(p):
            continue
        p_dir = p.split("/")[:-1]
        if p_dir != model_dir[: len(p_dir)]:
            continue  # in a sibling folder (another quant's)
        q = quant_of(p)
        rank = MMPROJ_PREFERENCE.index(q) if q in MMPROJ_PREFERENCE else len(MMPROJ_PREFERENCE)
        key = (-len(p_dir), rank, p)
        if best is None or key < best[0]:
            best = (key, p)
    return best[1] if best else None


def select(paths: Iterable[str], name: HubName, *, mmproj: bool = True) -> Selection:
    """The files `name` stands for among a repo's `paths` (raises HubNotFoundError).

    A GGUF split set is returned with all its parts whether or not `paths` has them: the Hub's
    listing must (check with `missing`), a cache may not yet.
    """
    paths = sorted(set(paths))
    if not any(is_model_gguf(p) for p in paths):
        if is_checkpoint(paths):
            if name.quant is not None:
                raise HubNotFoundError(
                    f"{name.repo_id} is a safetensors checkpoint, not a GGUF repo, so it has no :{name.quant}; "
                    f"convert it with `ms4local quantize {name.repo_id} --type {name.quant.upper()}`")
            return Selection(name, "checkpoint", checkpoint_files(paths))
        raise HubNotFoundError(f"{name.repo_id} has no GGUF model and no safetensors checkpoint "
                               "(config.json with model*.safetensors)")
    quant = name.quant or DEFAULT_QUANT
    first = find_model(paths, quant)
    if first is None:
        have = quants(paths)
        listed = ", ".join(have) if have else "none with a quant in its name"
        example = f" (e.g. `ms4local pull {name.repo_id}:{have[0]}`)" if have else ""
        if name.quant is None:
            raise HubNotFoundError(f"{name.repo_id} has no {DEFAULT_QUANT} GGUF (the default); name one of its "
                                   f"quants: {listed}{example}")
        raise HubNotFoundError(f"{name.repo_id} has no {name.quant} GGUF; its quants: {listed}{example}")
    projector = find_mmproj(paths, first) if mmproj else None
    return Selection(HubName(name.repo_id, (name.quant or quant_of(first) or quant).upper()), "gguf",
                     split_parts(first), projector)


def missing(selection: Selection, paths: Iterable[str]) -> list[str]:
    """The files of `selection` that are not among `paths`."""
    have = set(paths)
    return [p for p in selection.paths if p not in have]


def require_kind(selection: Selection, kind: str | None) -> Selection:
    """`selection`, or HubNotFoundError when a command that loads a GGUF was given a checkpoint repo
    (said before anything is downloaded: the checkpoint is 242 GB)."""
    if kind is None or selection.kind == kind:
        return selection
    repo = selection.name.repo_id
    if kind == "gguf":
        raise HubNotFoundError(f"{repo} is a safetensors checkpoint, not a GGUF; convert it first "
                               f"(`ms4local quantize {repo} --type Q4_K_M`) and pass the file it writes, "
                               "or name a GGUF repo (org/repo:QUANT)")
    raise HubNotFoundError(f"{selection.name} is a GGUF, not a safetensors checkpoint")
