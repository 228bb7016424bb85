"""Hugging Face Hub names (`org/repo[:QUANT]`) → files in the Hub's local cache.

`resolve(name)` answers from the cache without the network when the model is there and pulls it
otherwise; `pull(name)` always asks the Hub for the current files; `remove(name)` frees the cache;
the downloading, the cache layout, the token and the offline switch are huggingface_hub's.
"""

from .cache import CachedRepo, Resolved, remove, resolve_cached, scan
from .names import DEFAULT_QUANT, HubName, Selection, parse_name, require_name, select
from .remote import PullPlan, RemoteFile, download, plan_pull, size_text
from .resolve import hub_name, offline_message, pull, resolve
from .settings import HubSettings, free_space

__all__ = ["CachedRepo", "DEFAULT_QUANT", "HubName", "HubSettings", "PullPlan", "RemoteFile", "Resolved", "Selection",
           "download", "free_space", "hub_name", "offline_message", "parse_name", "plan_pull", "pull", "remove",
           "require_name", "resolve", "resolve_cached", "scan", "select", "size_text"]
