"""A model argument to files on disk: a path as it is, a Hub name from the cache without the
network, or pulled first when the cache lacks it (forbidden with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import HubNotFoundError, HubOfflineError
from . import listings
from .cache import Resolved, cached_repo, resolve_cached
from .names import HubName, parse_name, quants, select
from .remote import Progress, PullPlan, download, plan_pull, size_text
from .settings import HubSettings

OnPlan = Callable[[PullPlan], None]


def hub_name(text: str) -> HubName | None:
    """`text` as a Hub name, or None when it is a path: anything that exists on disk, that has the
    shape of a file name (`models/x.gguf`), or whose folder exists here (`models/typo`) is a path
    even when it also reads as `org/repo`."""
    path = Path(text).expanduser()
    if path.exists() or path.parent.is_dir() and path.parent != Path("."):
        return None
    return parse_name(text)


def resolve(name: HubName, *, mmproj: bool = True, kind: str | None = None, hub: HubSettings | None = None,
            on_plan: OnPlan | None = None, progress: Progress | None = None) -> Resolved:
    """`name` from the cache when its model is all there (no request is made), else pulled:
    `on_plan` hears the plan before the first byte, `progress` the bytes. With HF_HUB_OFFLINE=1 a
    name the cache lacks is HubOfflineError, which names the `ms4local pull` command (and its size
    when a listing of the repo was seen before). `kind` ("gguf", "checkpoint") refuses the other
    kind before anything is downloaded."""
    hub = hub or HubSettings.from_env()
    found = resolve_cached(name, mmproj=mmproj, kind=kind, hub=hub)
    if found is not None:
        return found
    if hub.offline:
        raise HubOfflineError(offline_message(name, hub, mmproj=mmproj))
    return pull(name, mmproj=mmproj, kind=kind, hub=hub, on_plan=on_plan, progress=progress)


def pull(name: HubName, *, mmproj: bool = True, kind: str | None = None, hub: HubSettings | None = None,
         on_plan: OnPlan | None = None, progress: Progress | None = None) -> Resolved:
    """Fetch what `name` stands for into the Hugging Face cache (what is there already is not
    fetched again) and return where it is. Offline, a name the cache holds is returned as it is."""
    hub = hub or HubSettings.from_env()
    if hub.offline:
        return resolve(name, mmproj=mmproj, kind=kind, hub=hub)
    plan = plan_pull(name, mmproj=mmproj, kind=kind, hub=hub)
    if on_plan is not None:
        on_plan(plan)
    return download(plan, hub=hub, progress=progress)


def offline_message(name: HubName, hub: HubSettings, *, mmproj: bool = True) -> str:
    """One line for a name the cache lacks while HF_HUB_OFFLINE=1: what to run, and how big it is."""
    size = ""
    seen = listings.load(hub, name.repo_id)
    if seen is not None:
        try:
            selection = select(seen, name, mmproj=mmproj)
            size = f" ({size_text(sum(seen[p][0] for p in selection.paths if p in seen))})"
        except HubNotFoundError as e:
            return f"{e} (as last seen online; HF_HUB_OFFLINE=1 is set)"
    what = str(name)
    repo = cached_repo(hub, name.repo_id)
    if repo is not None and name.quant is None:
        have = quants(repo.files)
        if have:
            what += f" (the cache has {', '.join(have)}: name one, e.g. {name.repo_id}:{have[0]})"
    return (f"{what} is not in the Hugging Face cache ({hub.cache_dir}) and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"run `ms4local pull {name}`{size} with the network")
