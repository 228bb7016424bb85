"""This machine as the OS reports it: RAM, and the versions of the installed packages.

No llama_cpp and no engine import: the engine can take `free_ram` from here without a cycle.
What llama.cpp itself sees (backends, devices) is the engine's to say; `ms4local.doctor` puts
the two together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path


def free_ram() -> int | None:
    """Bytes of RAM available to a new allocation (Linux MemAvailable; elsewhere sysconf), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory() -> dict[str, int]:
    """Total and available RAM in bytes (Linux: /proc/meminfo; elsewhere what sysconf knows).

    "available" falls back to MemFree on kernels older than MemAvailable (3.14), and to 0 where
    sysconf cannot say; `free_ram` is the figure to plan an allocation with.
    """
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree", 0))}
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            avail = 0
        return {"total": total, "available": avail}


def package_version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """ms4local's own cache folder (repaired projectors, Hub listings): $MS4LOCAL_CACHE, else
    $XDG_CACHE_HOME/ms4local, else ~/.cache/ms4local. Downloads themselves live in the HF cache."""
    if env.get("MS4LOCAL_CACHE"):
        return Path(env["MS4LOCAL_CACHE"])
    return (Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache") / "ms4local"
