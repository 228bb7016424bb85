"""llama.cpp's own C++ programs, built once from the sources llama-cpp-python vendors.

    .venv/bin/python bench/llamacpp_build.py [--target llama-server]…     (prints the binaries' folder)

The comparison programs (`make compat`, and benchmarks against llama.cpp) must run the same
llama.cpp that ms4local runs in-process, so the sources are the llama-cpp-python sdist of the
installed version (`pip download --no-binary :all:`; pip's cache serves it again), its
`vendor/llama.cpp`, built CPU-only with cmake + ninja into

    $MS4LOCAL_CACHE (else $XDG_CACHE_HOME/ms4local, else ~/.cache/ms4local)/llamacpp-<version>/
        src/        vendor/llama.cpp of the sdist
        build/bin/  the programs

and reused from there: a target already built is not configured or compiled again (cmake's own
up-to-date check would still cost a minute on 2 cores). The first build of llama-server takes
10–60 min on 2 shared cores; it runs at nice 10 so that it does not starve the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ms4local.system import cache_root  # noqa: E402

# CPU only, no network at build time: no curl/openssl (no model downloads), no web UI (its
# prebuilt assets would be fetched from Hugging Face), no tests or examples.
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
]


class BuildError(RuntimeError):
    """The sources could not be fetched or a program did not build (the message says which step)."""


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python: the llama.cpp that ms4local runs."""
    return version("llama-cpp-python")


def build_root(ver: str | None = None) -> Path:
    return cache_root() / f"llamacpp-{ver or llama_cpp_python_version()}"


def _run(cmd: list[str], log: Path, what: str, nice: bool = False) -> None:
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=(lambda: os.nice(10)) if nice else None)
    if p.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BuildError(f"{what} failed (exit {p.returncode}); the end of {log}:\n" + "\n".join(tail))


def sources(ver: str, root: Path, log=print) -> Path:
    """vendor/llama.cpp of the llama-cpp-python `ver` sdist, unpacked once under `root`/src."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist_dir = root / "sdist"
    name = f"llama_cpp_python-{ver}.tar.gz"
    if not (sdist_dir / name).is_file():
        log(f"fetching the llama-cpp-python {ver} sdist with pip")
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-binary", ":all:",
              "--no-deps", "-d", str(sdist_dir)], root / "fetch.log", "pip download")
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    # Unpack beside the final place and rename: a half-unpacked tree never looks complete.
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(sdist_dir / name) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist_dir / name} has no vendor/llama.cpp")
        tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / prefix, src)
    return src


def build(targets: list[str], ver: str | None = None, log=print) -> Path:
    """The folder holding `targets` (e.g. llama-server), built now if any is missing."""
    ver = ver or llama_cpp_python_version()
    root = build_root(ver)
    bindir = root / "build" / "bin"
    missing = [t for t in targets if not (bindir / t).is_file()]
    if not missing:
        return bindir
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} not found; install it (apt-get install cmake ninja-build, or pip install {tool})")
    src = sources(ver, root, log)
    logfile = root / "build.log"
    log(f"building {', '.join(missing)} from llama.cpp of llama-cpp-python {ver} into {root / 'build'} "
        f"(10-60 min on 2 cores; log: {logfile})")
    t = time.monotonic()
    _run(["cmake", "-S", str(src), "-B", str(root / "build"), "-G", "Ninja", *CMAKE_FLAGS], logfile, "cmake configure", nice=True)
    _run(["cmake", "--build", str(root / "build"), "--target", *missing], logfile, "cmake --build", nice=True)
    (root / f"build-seconds-{'+'.join(missing)}").write_text(f"{time.monotonic() - t:.0f}\n")
    return bindir


def build_seconds(target: str, ver: str | None = None) -> int | None:
    """How long the build that produced `target` took (None if it was not timed here)."""
    for f in build_root(ver).glob("build-seconds-*"):
        if target in f.name.removeprefix("build-seconds-").split("+"):
            return int(f.read_text().strip())
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", help="a cmake target, e.g. llama-server, llama-bench (repeatable; default llama-server)")
    args = ap.parse_args()
    try:
        print(build(args.target or ["llama-server"], log=lambda m: print(m, file=sys.stderr)))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
