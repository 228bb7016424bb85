"""What the local Hugging Face cache holds, read without the network; and freeing it.

The cache is huggingface_hub's (`models--ORG--NAME/{refs,snapshots,blobs}`), read through its
`scan_cache_dir` and emptied through its deletion strategies, so ms4local and every other tool that
uses the cache agree on what is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubNotFoundError
from .names import HubName, Selection, is_model_gguf, require_kind, select
from .settings import HubSettings


@dataclass(frozen=True)
class CachedRepo:
    """One model repo of the cache at the revision `main` points to (else its newest snapshot)."""

    repo_id: str
    revision: str
    snapshot: Path
    files: dict[str, Path]  # repo path → file in the snapshot
    sizes: dict[str, int]  # repo path → bytes
    partial_bytes: int = 0  # in `.incomplete` blobs: a download under way or interrupted
    info: object = field(default=None, repr=False, compare=False)  # huggingface_hub's CachedRepoInfo


@dataclass(frozen=True)
class Resolved:
    """A name resolved to files on disk.

    `model` is what a command takes: the first GGUF of the model (all parts lie beside it), or the
    checkpoint's snapshot directory. `mmproj` is the projector chosen for it, when there is one.
    """

    name: HubName
    kind: str  # "gguf" or "checkpoint"
    model: Path
    files: tuple[Path, ...]
    mmproj: Path | None
    nbytes: int

    @classmethod
    def of(cls, selection: Selection, local: dict[str, Path], sizes: dict[str, int]) -> Resolved:
        """From a selection and where each of its files is (repo path → local path)."""
        files = tuple(local[p] for p in selection.files)
        model = files[0] if selection.kind == "gguf" else local[selection.files[0]].parent
        mmproj = local.get(selection.mmproj) if selection.mmproj else None
        return cls(selection.name, selection.kind, model, files, mmproj,
                   sum(sizes.get(p, 0) for p in selection.paths))


def scan(hub: HubSettings) -> list[CachedRepo]:
    """The model repos in the cache (an absent cache is an empty one)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(hub.cache_dir)
    except CacheNotFound:
        return []
    repos = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        main = [r for r in repo.revisions if "main" in r.refs]
        rev = main[0] if main else max(repo.revisions, key=lambda r: r.last_modified)
        files = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
        partial = sum(p.stat().st_size for p in (repo.repo_path / "blobs").glob("*.incomplete"))
        repos.append(CachedRepo(repo.repo_id, rev.commit_hash, rev.snapshot_path,
                                {k: f.file_path for k, f in files.items()},
                                {k: f.size_on_disk for k, f in files.items()}, partial, repo))
    return repos


def cached_repo(hub: HubSettings, repo_id: str) -> CachedRepo | None:
    # The cache folder's name is case-sensitive, as the Hub's ids are for the cache.
    return next((r for r in scan(hub) if r.repo_id == repo_id), None)


def complete(repo: CachedRepo, selection: Selection) -> bool:
    """Whether every file of the model `selection` stands for is in `repo`'s snapshot."""
    if any(p not in repo.files for p in selection.files):
        return False
    if selection.kind == "checkpoint":
        return checkpoint_complete(repo.files)
    return True


def checkpoint_complete(files: dict[str, Path]) -> bool:
    """config.json, a tokenizer, and every shard the index names (or a single weights file)."""
    if "config.json" not in files or not ({"tokenizer.json", "tekken.json"} & files.keys()):
        return False
    index = files.get("model.safetensors.index.json")
    if index is None:
        return any(p.endswith(".safetensors") for p in files)
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(s in files for s in shards)


def resolve_cached(name: HubName, *, mmproj: bool = True, kind: str | None = None,
                   hub: HubSettings) -> Resolved | None:
    """`name` from the cache alone (no network), or None when its model is not all there.

    The projector is the best one the cache holds: `pull` fetches it before the model, so a
    complete model means its projector was fetched too (unless the pull asked for none). `kind`
    ("gguf", "checkpoint") refuses the other kind (names.require_kind).
    """
    repo = cached_repo(hub, name.repo_id)
    if repo is None:
        return None
    try:
        selection = select(repo.files, name, mmproj=mmproj)
    except HubNotFoundError:
        return None
    require_kind(selection, kind)
    if not complete(repo, selection):
        return None
    return Resolved.of(selection, repo.files, repo.sizes)


def remove(name: HubName, *, hub: HubSettings) -> int:
    """Delete `name` from the cache and return the bytes freed (raises HubNotFoundError).

    `org/repo` removes the whole repo (every revision). `org/repo:QUANT` removes that quant's files
    (every part), and the projector too when no other model of the repo stays; a revision left
    without a model goes whole. Blobs another remaining file points to are kept.
    """
    from huggingface_hub import DeleteCacheStrategy

    repo = cached_repo(hub, name.repo_id)
    if repo is None:
        raise HubNotFoundError(f"{name.repo_id} is not in the Hugging Face cache ({hub.cache_dir})")
    info = repo.info
    if name.quant is None:
        strategy = _cache_info(hub).delete_revisions(*(r.commit_hash for r in info.revisions))  # type: ignore[attr-defined]
        strategy.execute()
        return strategy.expected_freed_size

    doomed_revisions, doomed_files = [], []
    for rev in info.revisions:  # type: ignore[attr-defined]
        files = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
        try:
            selection = select(files, name)
        except HubNotFoundError:
            continue
        if selection.kind != "gguf":
            continue
        gone = {p for p in selection.files if p in files}
        if not gone:
            continue
        if not any(is_model_gguf(p) for p in files.keys() - gone):
            doomed_revisions.append(rev.commit_hash)
        else:
            doomed_files += [files[p] for p in gone]
    if not doomed_revisions and not doomed_files:
        raise HubNotFoundError(f"{name} is not in the Hugging Face cache ({hub.cache_dir}); `ms4local list` shows "
                               "what is")
    freed = 0
    if doomed_revisions:
        strategy = _cache_info(hub).delete_revisions(*doomed_revisions)
        strategy.execute()
        freed += strategy.expected_freed_size
    if doomed_files:
        # huggingface_hub deletes whole revisions; a quant is part of one. Its strategy object
        # still does the deleting, in its safe order (the snapshot's links before the blobs), for
        # the blobs no remaining file of any revision links to.
        info = _cache_info(hub)
        kept_links = {f.blob_path for r in info.repos if r.repo_id == name.repo_id for rev in r.revisions
                      for f in rev.files if f.file_path not in {d.file_path for d in doomed_files}}
        blobs = {f.blob_path for f in doomed_files} - kept_links
        sizes = {f.blob_path: f.size_on_disk for f in doomed_files}
        strategy = DeleteCacheStrategy(expected_freed_size=sum(sizes[b] for b in blobs), blobs=frozenset(blobs),
                                       refs=frozenset(), repos=frozenset(),
                                       snapshots=frozenset(f.file_path for f in doomed_files))
        strategy.execute()
        freed += strategy.expected_freed_size
    return freed


def _cache_info(hub: HubSettings):  # type: ignore[no-untyped-def]
    from huggingface_hub import scan_cache_dir

    return scan_cache_dir(hub.cache_dir)
