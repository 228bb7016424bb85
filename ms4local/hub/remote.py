"""Fetching a name from the Hub: the plan (files, sizes, what the cache already has), then the
download into huggingface_hub's cache, with progress, resume and one typed error per failure.

The downloading is huggingface_hub's `hf_hub_download`: it writes `blobs/<etag>.incomplete`, resumes
it with an HTTP Range request when called again, and renames it and links it into the snapshot
only once complete, so an interrupted pull (Ctrl-C, a kill, a lost connection) leaves nothing under
a final name and the same command carries on from the byte it reached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import (DiskSpaceError, HubAccessError, HubError, HubNameError, HubNetworkError, HubNotFoundError,
                      HubOfflineError)
from . import listings
from .cache import Resolved
from .names import HubName, Selection, missing, require_kind, select
from .settings import HubSettings, free_space

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, file being fetched)

# A connection lost in the middle of a file: hf_hub_download raises, and the next call resumes
# from the `.incomplete` blob. Waits between attempts, in seconds.
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0)
POLL_SECONDS = 0.25  # how often the progress callback hears of the bytes on disk


@dataclass(frozen=True)
class RemoteFile:
    path: str  # in the repo
    size: int
    blob: str  # the cache's name for its content: the sha256 of an LFS file, the git blob id otherwise


@dataclass(frozen=True)
class PullPlan:
    """What `pull` will fetch: `files` in download order (the projector first), with their sizes,
    and how many bytes of them the cache already holds (complete blobs and `.incomplete` parts)."""

    selection: Selection
    revision: str  # the commit `main` pointed to when the plan was made
    files: tuple[RemoteFile, ...]
    cached: frozenset[str]  # paths already complete in the cache
    partial: dict[str, int]  # path → bytes of an interrupted download of it

    @property
    def name(self) -> HubName:
        return self.selection.name

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def to_fetch(self) -> int:
        """Bytes still to download (and to find room for)."""
        return sum(f.size - self.partial.get(f.path, 0) for f in self.files if f.path not in self.cached)


def storage_folder(hub: HubSettings, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def plan_pull(name: HubName, *, mmproj: bool = True, kind: str | None = None, hub: HubSettings) -> PullPlan:
    """List the repo on the Hub and choose the files `name` stands for (two small API requests;
    no file is downloaded). `kind` ("gguf", "checkpoint") refuses the other kind. Raises the Hub* errors."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    if hub.offline:
        raise HubOfflineError(f"{name} needs the Hub, and HF_HUB_OFFLINE=1 forbids the network")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    with hub_errors(name, hub):
        info = api.model_info(name.repo_id, revision="main")
        revision = info.sha or "main"
        listing = {e.path: e for e in api.list_repo_tree(name.repo_id, revision=revision, recursive=True)
                   if isinstance(e, RepoFile)}
    remote = {p: RemoteFile(p, int(e.size or 0), e.lfs.sha256 if e.lfs else e.blob_id) for p, e in listing.items()}
    listings.save(hub, name.repo_id, {p: (f.size, f.blob) for p, f in remote.items()})
    selection = require_kind(select(remote, name, mmproj=mmproj), kind)
    absent = missing(selection, remote)
    if absent:
        raise HubNotFoundError(f"{name.repo_id} lists {selection.files[0]} but not {absent[0]}"
                               + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                               + "; the repo's split set is incomplete")
    files = tuple(remote[p] for p in selection.paths)
    blobs = storage_folder(hub, name.repo_id) / "blobs"
    cached = frozenset(f.path for f in files if _cached(hub, name.repo_id, revision, f.path) is not None
                       or (blobs / f.blob).is_file())
    partial = {f.path: _size(blobs / f"{f.blob}.incomplete") for f in files if f.path not in cached}
    return PullPlan(selection, revision, files, cached, {k: v for k, v in partial.items() if v})


def _cached(hub: HubSettings, repo_id: str, revision: str, path: str) -> Path | None:
    """The file in the cache's snapshot of `revision`, or None (huggingface_hub's own lookup)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, path, cache_dir=hub.cache_dir, revision=revision)
    return Path(hit) if isinstance(hit, str) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_space(plan: PullPlan, hub: HubSettings) -> None:
    """DiskSpaceError unless the cache's file system has room for what is left to fetch."""
    need, free = plan.to_fetch, free_space(hub.cache_dir)
    if need > free:
        raise DiskSpaceError(f"{plan.name} needs {size_text(need)} more in {hub.cache_dir}, which has {size_text(free)} "
                             "free; make room (`ms4local rm NAME` frees a model) or set HF_HUB_CACHE to a bigger disk")


def download(plan: PullPlan, *, hub: HubSettings, progress: Progress | None = None) -> Resolved:
    """Fetch the plan's files into the cache (disk space first) and return where they are."""
    from huggingface_hub import hf_hub_download

    check_space(plan, hub)
    local: dict[str, Path] = {}
    sizes = {f.path: f.size for f in plan.files}
    meter = _Meter(storage_folder(hub, plan.name.repo_id) / "blobs", plan.files, progress)
    with _quiet_hub_bars(), meter:
        for f in plan.files:
            meter.current = f.path
            hit = _cached(hub, plan.name.repo_id, plan.revision, f.path)
            if hit is not None:  # already linked in the snapshot of the planned commit: no request at all
                local[f.path] = hit
                meter.done(f.path)
                continue
            for attempt in range(len(RETRY_WAITS) + 1):
                try:
                    with hub_errors(plan.name, hub):
                        local[f.path] = Path(hf_hub_download(
                            plan.name.repo_id, f.path, revision="main", cache_dir=hub.cache_dir,
                            endpoint=hub.endpoint, token=hub.token))
                    break
                except _Dropped as e:
                    if attempt == len(RETRY_WAITS):
                        raise HubNetworkError(f"downloading {f.path} from {hub.endpoint} kept failing "
                                              f"({e.reason}); run the same command again to resume") from None
                    time.sleep(RETRY_WAITS[attempt])
            meter.done(f.path)
    return Resolved.of(plan.selection, local, sizes)


class _Dropped(HubNetworkError):
    """A connection lost while a file was streaming; `download` tries again, which resumes it
    (anywhere else it is a plain network error)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"the connection to {endpoint} broke ({reason}); run the command again")
        self.reason = reason


class _Meter:
    """Reports the bytes on disk to `progress` from a thread, as hf_hub_download has no byte
    callback of its own: complete blobs, plus the file being written for an unfinished one
    (`<blob>.incomplete` over HTTP; hf_xet writes a `.<blob>.incomplete.<random>.tmp` beside it)."""

    def __init__(self, blobs: Path, files: tuple[RemoteFile, ...], progress: Progress | None) -> None:
        self.blobs, self.files, self.progress = blobs, files, progress
        self.total = sum(f.size for f in files)
        self.finished: set[str] = set()
        self.current = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ms4local-pull-progress", daemon=True)

    def bytes_done(self) -> int:
        done = 0
        for f in self.files:
            if f.path in self.finished or (self.blobs / f.blob).is_file():
                done += f.size
            elif f.path == self.current:
                done += min(f.size, max((_size(p) for p in self.blobs.glob(f"*{f.blob}.incomplete*")), default=0))
        return done

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.bytes_done(), self.total, self.current)

    def done(self, path: str) -> None:
        self.finished.add(path)
        self.report()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.report()

    def __enter__(self) -> _Meter:
        if self.progress is not None:
            self.report()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@contextmanager
def _quiet_hub_bars() -> Iterator[None]:
    """huggingface_hub's own tqdm bars (HTTP and Xet) off while ms4local draws its bar (restored afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    groups = [g for g in ("huggingface_hub.http_get", "huggingface_hub.xet_get") if not are_progress_bars_disabled(g)]
    for g in groups:
        disable_progress_bars(g)
    try:
        yield
    finally:
        for g in groups:
            enable_progress_bars(g)


@contextmanager
def hub_errors(name: HubName, hub: HubSettings) -> Iterator[None]:
    """huggingface_hub's and requests' exceptions as ms4local's typed errors, one line each."""
    import requests
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                       LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    page = f"{hub.endpoint}/{name.repo_id}"
    try:
        yield
    except OfflineModeIsEnabled:
        raise HubOfflineError(f"{name} needs the Hub, and HF_HUB_OFFLINE=1 forbids the network") from None
    except LocalEntryNotFoundError as e:  # hf_hub_download's "cannot reach the Hub, not in the cache"
        raise HubNetworkError(f"cannot reach {hub.endpoint} to download {name}"
                              f"{_reason(e.__cause__)}; check the network and run the command again") from None
    except GatedRepoError as e:
        raise HubAccessError(f"{name.repo_id} is gated (HTTP {_status(e)}): accept its conditions at {page} and "
                             "log in with that account (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError as e:
        if _status(e) == 401:
            raise HubAccessError(f"{name.repo_id} was not found on {hub.endpoint} (HTTP 401): it does not exist, or it "
                                 "is private and needs a token (`hf auth login`, or set HF_TOKEN)") from None
        raise HubNotFoundError(f"no model repository {name.repo_id} on {hub.endpoint} (HTTP {_status(e)})") from None
    except RevisionNotFoundError as e:
        raise HubNotFoundError(f"{name.repo_id} has no revision main (HTTP {_status(e)})") from None
    except EntryNotFoundError as e:
        raise HubNotFoundError(f"a file of {name} is no longer in the repo (HTTP {_status(e)}); "
                               "run the command again to plan anew") from None
    except HfHubHTTPError as e:
        status = _status(e)
        if status == 401:
            raise HubAccessError(f"the Hub refused the token for {name.repo_id} (HTTP 401); check HF_TOKEN or "
                                 "log in again (`hf auth login`)") from None
        if status == 403:
            raise HubAccessError(f"access to {name.repo_id} is forbidden (HTTP 403): the token lacks read access "
                                 f"to it; ask for access at {page}") from None
        raise HubError(f"the Hub answered HTTP {status} for {name}; try again later") from None
    except HFValidationError:
        raise HubNameError(f"{name.repo_id!r} is not a valid Hugging Face repo id") from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ReadTimeout) as e:
        raise _Dropped(hub.endpoint, _reason(e).strip(" ()")) from None
    except requests.exceptions.ConnectionError as e:
        if _started(e):
            raise _Dropped(hub.endpoint, _reason(e).strip(" ()")) from None
        raise HubNetworkError(f"cannot reach {hub.endpoint}{_reason(e)}; check the network (or set "
                              "HF_HUB_OFFLINE=1 to use only what is cached)") from None
    except requests.exceptions.Timeout as e:
        raise HubNetworkError(f"{hub.endpoint} did not answer in time{_reason(e)}; try again later") from None


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _started(e: Exception) -> bool:
    """Whether a ConnectionError broke a transfer under way (vs. one that never connected)."""
    text = str(e)
    return "Connection broken" in text or "IncompleteRead" in text or "reset by peer" in text


def _reason(e: BaseException | None) -> str:
    """A short cause for a one-line message: the innermost OS-level reason if there is one."""
    if e is None:
        return ""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Network is unreachable", "timed out", "Connection reset by peer",
                   "IncompleteRead", "Connection broken"):
        if marker in text:
            return f" ({marker})"
    return f" ({type(e).__name__})"


def size_text(n: float) -> str:
    """Bytes for a one-line message: 67.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
