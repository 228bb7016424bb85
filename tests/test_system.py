"""ms4local.system: RAM as /proc/meminfo and sysconf report it, with every fallback."""

from __future__ import annotations

import io
import os

import pytest

from ms4local import system

MEMINFO = "MemTotal:       100 kB\nMemFree:         10 kB\nMemAvailable:    50 kB\n"
SYSCONF = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 9, "SC_AVPHYS_PAGES": 7}


@pytest.fixture
def machine(monkeypatch):
    """machine(meminfo_text_or_None, sysconf_names): what the two sources say; None: no /proc/meminfo."""
    def make(meminfo: str | None, sysconf: dict[str, int] = SYSCONF) -> None:
        def fake_open(path, *args, **kwargs):
            assert path == "/proc/meminfo"
            if meminfo is None:
                raise FileNotFoundError(path)
            return io.StringIO(meminfo)

        def fake_sysconf(name: str) -> int:
            if name not in sysconf:
                raise ValueError(f"unrecognized configuration name {name}")
            return sysconf[name]

        monkeypatch.setattr(system, "open", fake_open, raising=False)
        monkeypatch.setattr(os, "sysconf", fake_sysconf)

    return make


@pytest.mark.parametrize("meminfo, expected", [
    (MEMINFO, 50 * 1024),
    ("MemTotal: 100 kB\nMemFree: 10 kB\n", 7 * 4096),  # no MemAvailable (kernels before 3.14): sysconf
    ("MemAvailable: lots\n", 7 * 4096),
    (None, 7 * 4096),
])
def test_free_ram(machine, meminfo, expected):
    machine(meminfo)
    assert system.free_ram() == expected


def test_free_ram_is_none_when_nothing_says(machine):
    machine(None, {"SC_PAGE_SIZE": 4096})
    assert system.free_ram() is None


@pytest.mark.parametrize("meminfo, expected", [
    (MEMINFO, {"total": 100 * 1024, "available": 50 * 1024}),
    ("MemTotal: 100 kB\nMemFree: 10 kB\n", {"total": 100 * 1024, "available": 10 * 1024}),
    (None, {"total": 9 * 4096, "available": 7 * 4096}),
])
def test_memory(machine, meminfo, expected):
    machine(meminfo)
    assert system.memory() == expected


def test_package_version():
    assert system.package_version("numpy") != "not installed"
    assert system.package_version("no-such-distribution-ms4local") == "not installed"
