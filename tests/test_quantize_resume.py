"""A quantization killed with SIGKILL at any point resumes: the writer's promise, tested from outside.

Each run is a separate process, killed the way a crash or the OOM killer would kill it. The kill
points come from the journal (`FIRST.part.journal` gains one line per fsynced tensor): the test
polls it and sends SIGKILL once it lists N tensors. The points between the last tensor and the
final renames are too short to hit by polling, so the driver below can kill itself at its k-th
rename of a `.part` file instead (a SIGKILL from inside is still a SIGKILL: no cleanup runs).

What every case checks:
  (a) while a run is alive, no final file name exists unless the journal already lists every tensor
      (the directory is polled throughout, killed runs and reruns alike);
  (b) the same command run again finishes and its files are byte-identical to a clean run's;
  (c) the rerun resumed where it should: its first progress report is for the first tensor the
      journal did not list (or there is none when all were listed), never for tensor 0;
  (d) a damaged partial (a flipped byte in the last finished tensor or in the header, a torn journal
      line, a changed checkpoint) makes it start over, or resume earlier, and still gives the same
      bytes;
  (e) all of it again for a split set (`--split-max-tensors 10`).

The runs go through `DRIVER`, which calls `quantize.convert` (the function behind `ms4local
quantize`) and prints each progress report; one test drives the `ms4local` command itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest

from helpers import BIN, ROOT
from quantize import convert
from quantize.synth import TinySpec, make_checkpoint
from quantize.writer import journal_path, lock_path, output_lock

# test_quantize.KQ: every ne0 a multiple of 256, so Q4_K_M really writes K-quants (the session-scoped
# `ckpt` fixture generates it once for both modules). 64 tensors, ~1.4 s at one thread, the expert
# stacks ~0.1 s each: long enough to kill anywhere, short enough for a dozen runs.
SPEC = TinySpec(layers=4, hidden=256, heads=4, q_lora=256, kv_lora=256, nope=32, rope=32, v_dim=64, experts=16,
                top_k=2, moe_inter=256, inter=512, first_dense=1, vocab=2000, dtype="BF16")
TYPE = "Q4_K_M"
SPLIT = 10
TIMEOUT = 60
POLL = 0.0005  # seconds between looks at the directory and the journal; a tensor takes 1-100 ms

# One thread: the quantizer keeps one core, the polling loop the other (the test machine has two).
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from quantize import convert

    src, out, out_type, split, kill_at_rename = sys.argv[1:]
    renames = 0
    real_replace = os.replace

    def replace(a, b, *args, **kwargs):
        global renames
        if str(b).endswith(".gguf") and str(a).endswith(".part"):
            renames += 1
            if renames == int(kill_at_rename):
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(a, b, *args, **kwargs)

    os.replace = replace
    convert(src, out=out, out_type=out_type, threads=1, split_max_tensors=int(split),
            progress=lambda done, total, name: print(done, name, flush=True))
""")


@dataclass
class Plan:
    """What a run must produce: tensor names and byte sizes in write order, the final file names."""

    out: Path  # the -o argument
    names: list[str]
    sizes: list[int]
    files: list[Path]

    def before(self, k: int) -> int:
        """Progress bytes once the first k tensors are written (the writer counts unpadded bytes)."""
        return sum(self.sizes[:k])

    @property
    def journal(self) -> Path:
        return journal_path(self.files[0])


@dataclass
class Run:
    returncode: int
    progress: list[tuple[int, str]]  # (bytes done, tensor) per progress report
    journal_tensors: int | None  # tensors the journal lists when the run ended (None: no journal)
    stderr: str


def plan_of(src: Path, out: Path, split: int = 0) -> Plan:
    p = convert(src, out=out, out_type=TYPE, split_max_tensors=split, dry_run=True)
    return Plan(out, [r.name for r in p.rows], [r.nbytes for r in p.rows], p.files)


def journal_entries(path: Path) -> list[dict] | None:
    """The tensor lines of a journal that parse (a torn last line is not one), or None without a journal."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return None
    entries = []
    for line in lines[1:]:
        try:
            e = json.loads(line)
        except ValueError:
            break
        if "tensor" in e:  # not the {"renaming": true} marker
            entries.append(e)
    return entries


def count_journal(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, env=env)


def watch(proc: subprocess.Popen, plan: Plan, kill_after: int | None = None) -> None:
    """Poll the output directory until `proc` ends (or SIGKILL it once the journal lists `kill_after`
    tensors), failing at once if a final name shows up while the journal is still incomplete."""
    finals = {f.name for f in plan.files}
    directory = plan.files[0].parent
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run took over {TIMEOUT} s")
        present = finals & set(os.listdir(directory))
        if present:
            n = count_journal(plan.journal)  # read after the listing: a complete journal stays complete
            if n != -1 and n < len(plan.names):
                proc.kill()
                pytest.fail(f"{sorted(present)} exists while the journal lists only {n} of {len(plan.names)} tensors")
        if kill_after is not None and count_journal(plan.journal) >= kill_after:
            proc.kill()
            break
        time.sleep(POLL)
    proc.wait()


def run(src: Path, plan: Plan, tmp: Path, *, kill_after: int | None = None, kill_at_rename: int = 0,
        split: int = 0) -> Run:
    """One run of the driver; a kill_after run must really be killed before it finishes."""
    log = tmp / f"progress-{time.monotonic_ns()}.txt"
    proc = start([sys.executable, "-c", DRIVER, str(src), str(plan.out), TYPE,
                  str(split), str(kill_at_rename)], log)
    watch(proc, plan, kill_after)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    progress = [(int(d), n) for d, n in (line.split() for line in log.read_text().splitlines())]
    entries = journal_entries(plan.journal)
    result = Run(proc.returncode, progress, None if entries is None else len(entries), stderr)
    if kill_after is not None or kill_at_rename:
        assert result.returncode == -9, f"the run was not killed (exit {result.returncode}): {stderr[-2000:]}"
        assert result.journal_tensors is not None, "a killed run left no journal"
        if kill_after is not None:
            assert kill_after <= result.journal_tensors < len(plan.names), "the kill did not land part-way"
        assert not (set(os.listdir(plan.files[0].parent)) & {plan.files[0].name}), \
            "the first file exists under its final name after a killed run"
    return result


def assert_complete(plan: Plan, reference: Plan) -> None:
    """Only the final files (and the report) are left, byte-identical to the clean run's."""
    directory = plan.files[0].parent
    left = sorted(p.name for p in directory.iterdir() if not p.name.endswith(".quant.json"))
    assert left == sorted(f.name for f in plan.files), f"left in the output directory: {left}"
    for got, want in zip(plan.files, reference.files):
        assert got.read_bytes() == want.read_bytes(), f"{got.name} differs from the uninterrupted run's"


def assert_resumed_at(rerun: Run, plan: Plan, k: int) -> None:
    """The rerun's first progress report is inside tensor k: tensors 0..k-1 were not written again."""
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    if k == len(plan.names):
        assert rerun.progress == [], f"every tensor was on disk, yet the rerun wrote {rerun.progress[:3]}"
        return
    assert rerun.progress, "the rerun reported no progress"
    done, name = rerun.progress[0]
    assert name == plan.names[k], f"the rerun started at {name}, expected {plan.names[k]} (tensor {k})"
    assert plan.before(k) < done <= plan.before(k + 1), f"the rerun's first progress {done} is not inside tensor {k}"


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def src(ckpt):
    return ckpt(SPEC)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory):
    """clean(split) -> the plan of an uninterrupted run's files (made once per split setting)."""
    cache: dict[int, Plan] = {}

    def make(split: int = 0) -> Plan:
        if split not in cache:
            out = tmp_path_factory.mktemp("clean") / "m.gguf"
            result = convert(src, out=out, out_type=TYPE, threads=2, split_max_tensors=split)
            plan = plan_of(src, out, split)
            assert result.files == plan.files
            cache[split] = plan
        return cache[split]

    return make


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# --- (a)-(c): killed after N tensors, or after the last one, then run again -------------------------

@pytest.mark.parametrize("split", [0, SPLIT], ids=["single", "split"])
@pytest.mark.parametrize("where", [0, 1 / 3, 2 / 3], ids=["at-start", "third", "two-thirds"])
def test_killed_after_n_tensors_resumes(src, clean, out_dir, tmp_path, split, where):
    reference = clean(split)
    plan = plan_of(src, out_dir / "m.gguf", split)
    assert len(plan.files) == (7 if split else 1)
    killed = run(src, plan, tmp_path, kill_after=int(where * len(plan.names)), split=split)
    k = killed.journal_tensors
    parts = sorted(p.name for p in out_dir.iterdir())
    # SIGKILL leaves the lock file too (not the lock: the kernel drops that), which the rerun takes over.
    assert parts == sorted([f.name + ".part" for f in plan.files] + [plan.journal.name, lock_path(plan.files[0]).name])

    rerun = run(src, plan, tmp_path, split=split)
    assert_resumed_at(rerun, plan, k)
    assert rerun.progress[-1][0] == plan.before(len(plan.names))
    assert_complete(plan, reference)


@pytest.mark.parametrize("split", [0, SPLIT], ids=["single", "split"])
def test_killed_after_the_last_tensor_before_renaming(src, clean, out_dir, tmp_path, split):
    """All tensors fsynced and journaled, not one file renamed: the rerun writes nothing, only renames."""
    reference = clean(split)
    plan = plan_of(src, out_dir / "m.gguf", split)
    killed = run(src, plan, tmp_path, kill_at_rename=1, split=split)
    assert killed.journal_tensors == len(plan.names)
    assert not {f.name for f in plan.files} & set(os.listdir(out_dir))
    rerun = run(src, plan, tmp_path, split=split)
    assert_resumed_at(rerun, plan, len(plan.names))
    assert_complete(plan, reference)


def test_split_killed_between_renames(src, clean, out_dir, tmp_path):
    """The last shard has its final name, the others are `.part`: the set is not usable yet (the first
    shard is missing), and the same command must finish it."""
    reference = clean(SPLIT)
    plan = plan_of(src, out_dir / "m.gguf", SPLIT)
    run(src, plan, tmp_path, kill_at_rename=2, split=SPLIT)
    assert plan.files[-1].exists() and not plan.files[0].exists()
    rerun = run(src, plan, tmp_path, split=SPLIT)
    assert rerun.returncode == 0, rerun.stderr.strip().splitlines()[-1]
    assert_complete(plan, reference)


def test_cli_killed_and_run_again(src, clean, out_dir, tmp_path, cli_env):
    """The `ms4local quantize` command itself: killed half-way, the same command line finishes the file.

    The command shows no per-tensor progress, so resuming is observed through the journal: a hard link
    keeps the killed run's journal, and a resumed run appends to that same file (one that starts
    over unlinks it and writes a new one)."""
    reference = clean(0)
    plan = plan_of(src, out_dir / "m.gguf")
    cmd = [str(BIN / "ms4local"), "quantize", str(src), "--type", TYPE, "-o", str(plan.out), "-t", "1"]
    proc = start(cmd, tmp_path / "cli-1.txt", cli_env)
    watch(proc, plan, kill_after=len(plan.names) // 2)
    proc.stderr.close()
    assert proc.returncode == -9
    killed = plan.journal.read_bytes()
    k = len(journal_entries(plan.journal))
    assert len(plan.names) // 2 <= k < len(plan.names)
    keep = tmp_path / "journal-of-the-killed-run"
    os.link(plan.journal, keep)

    proc = start(cmd, tmp_path / "cli-2.txt", cli_env)
    watch(proc, plan)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err[-2000:]
    assert "wrote" in err
    after = keep.read_bytes()
    assert after.startswith(killed), "the rerun did not continue the killed run's journal: it started over"
    # header + one line per tensor + the "renaming" marker written once every tensor is on disk
    assert after.count(b"\n") == len(plan.names) + 2, "the rerun did not append one line per remaining tensor"
    assert_complete(plan, reference)


# --- (d): a damaged partial or a changed checkpoint ----------------------------------------------------

def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("split, damage", [(0, "last-tensor-byte"), (SPLIT, "last-tensor-byte"), (0, "header-byte"),
                                           (SPLIT, "torn-journal-line")])
def test_damaged_partial(src, clean, out_dir, tmp_path, split, damage):
    reference = clean(split)
    plan = plan_of(src, out_dir / "m.gguf", split)
    killed = run(src, plan, tmp_path, kill_after=len(plan.names) // 2, split=split)
    entries = journal_entries(plan.journal)
    k = killed.journal_tensors
    last = entries[-1]
    assert last["tensor"] == plan.names[k - 1]
    part = plan.files[last["shard"]].with_name(plan.files[last["shard"]].name + ".part")
    if damage == "last-tensor-byte":
        # Inside the data of the last journaled tensor (its padded slot ends at `end`).
        size = plan.sizes[k - 1]
        pad = -size % gguf.GGUF_DEFAULT_ALIGNMENT
        flip(part, last["end"] - pad - size // 2)
        expect = 0
    elif damage == "header-byte":
        flip(plan.files[0].with_name(plan.files[0].name + ".part"), 100)
        expect = 0
    else:
        data = plan.journal.read_bytes()
        cut = data.rstrip(b"\n").rfind(b"\n") + 1  # the start of the last line
        plan.journal.write_bytes(data[: cut + (len(data) - cut) // 2])  # half a line, no newline
        expect = k - 1
    rerun = run(src, plan, tmp_path, split=split)
    if expect:
        assert_resumed_at(rerun, plan, expect)
    else:
        _assert_started_over(rerun, plan)
    assert_complete(plan, reference)


def _assert_started_over(rerun: Run, plan: Plan) -> None:
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done, name = rerun.progress[0]
    assert name == plan.names[0] and done <= plan.sizes[0], f"the rerun did not start over: first report {done} {name}"


def test_checkpoint_changed_between_runs(src, out_dir, tmp_path):
    """The checkpoint is replaced (same shapes, other weights) after the kill: the rerun must not keep
    a single tensor of the old one; its file is the clean conversion of the new checkpoint."""
    mine = tmp_path / "Tiny-Mistral4"  # the same directory name: the model name in the header matches
    shutil.copytree(src, mine)
    plan = plan_of(mine, out_dir / "m.gguf")
    run(mine, plan, tmp_path, kill_after=len(plan.names) // 2)
    old_weights = (mine / "model.safetensors").read_bytes()
    shutil.rmtree(mine)
    make_checkpoint(mine, SPEC, seed=1)
    assert (mine / "model.safetensors").read_bytes() != old_weights
    rerun = run(mine, plan, tmp_path)
    _assert_started_over(rerun, plan)
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    convert(mine, out=ref_dir / "m.gguf", out_type=TYPE, threads=2)
    assert_complete(plan, plan_of(mine, ref_dir / "m.gguf"))


def test_report_of_a_resumed_run_covers_every_tensor(src, clean, out_dir, tmp_path):
    reference = clean(0)
    plan = plan_of(src, out_dir / "m.gguf")
    run(src, plan, tmp_path, kill_after=len(plan.names) // 2)
    assert run(src, plan, tmp_path).returncode == 0
    assert_complete(plan, reference)
    want = json.loads(reference.files[0].with_name("m.quant.json").read_text())
    got = json.loads((out_dir / "m.quant.json").read_text())
    assert sorted(got["tensors"]) == sorted(want["tensors"])
    assert got == want


# --- (f) two runs to the same output at once: the second one stops (issue #18) ------------------------

# The first of two runs: the real convert, paused inside its first progress report (so while it holds
# the output and has written part of it) until the test creates the gate file.
PAUSED = textwrap.dedent("""
    import os, sys, time
    from quantize import convert

    src, out, out_type, gate = sys.argv[1:]

    def wait(done, total, name):
        while not os.path.exists(gate):
            time.sleep(0.01)

    convert(src, out=out, out_type=out_type, threads=1, progress=wait)
""")


def test_second_run_to_the_same_output_is_refused_while_the_first_writes(src, clean, out_dir, tmp_path, cli_env):
    """Two `ms4local quantize` runs to one -o used to interleave their tensors in the same `.part`; one
    said "wrote" over a file that matched neither. Now the second fails at once, naming the first's
    pid (with --force too), and the first finishes a file byte-identical to a clean run's."""
    reference = clean(0)
    plan = plan_of(src, out_dir / "m.gguf")
    gate = tmp_path / "go-on"
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(src), str(plan.out), TYPE, str(gate)], cwd=ROOT,
                             stderr=subprocess.PIPE, env=cli_env)
    part = plan.out.with_name(plan.out.name + ".part")
    deadline = time.monotonic() + TIMEOUT
    while not (part.exists() and part.stat().st_size > 0 and lock_path(plan.out).exists()):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
        time.sleep(POLL)
    cmd = [str(BIN / "ms4local"), "quantize", str(src), "--type", TYPE, "-o", str(plan.out), "-t", "1"]
    try:
        for extra in ([], ["--force"]):
            second = subprocess.run(cmd + extra, capture_output=True, text=True, env=cli_env, timeout=TIMEOUT)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 1 and len(lines) == 1, second.stderr
            assert lines[0].startswith("error: ") and f"pid {first.pid}" in lines[0] and "another" in lines[0], lines[0]
            assert first.poll() is None
    finally:
        gate.touch()
        err = first.communicate(timeout=TIMEOUT)[1].decode()
    assert first.returncode == 0, err[-2000:]
    assert_complete(plan, reference)  # also: no lock file left behind


def test_a_killed_runs_lock_file_does_not_block_the_resume(src, clean, out_dir, tmp_path):
    """SIGKILL leaves the lock file (nothing can remove it) but not the lock (the kernel drops it):
    the next run takes it over and resumes."""
    reference = clean(0)
    plan = plan_of(src, out_dir / "m.gguf")
    killed = run(src, plan, tmp_path, kill_after=len(plan.names) // 2)
    assert lock_path(plan.files[0]).exists(), "the killed run left no lock file: nothing was tested"
    rerun = run(src, plan, tmp_path)
    assert_resumed_at(rerun, plan, killed.journal_tensors)
    assert_complete(plan, reference)


def test_requantize_refuses_an_output_another_run_holds(src, gguf_file, out_dir, cli_env):
    """The GGUF → GGUF route takes the same lock: held here by this test process, as a run would."""
    source = gguf_file(src, "F16")
    with output_lock(out_dir / "m.gguf"):
        p = subprocess.run([str(BIN / "ms4local"), "quantize", str(source), "--type", "Q8_0", "-o",
                            str(out_dir / "m.gguf")], capture_output=True, text=True, env=cli_env, timeout=TIMEOUT)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and f"pid {os.getpid()}" in lines[0], p.stderr
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_while_requantizing_a_gguf_promises_no_resume(src, gguf_file, out_dir, cli_env):
    """llama.cpp's quantizer has no journal: Ctrl-C must say the run starts over, leave nothing, and
    stop at once (the child is killed, not waited for)."""
    source = gguf_file(src, "F16")
    out = out_dir / "m.gguf"
    # As a terminal delivers Ctrl-C: SIGINT to the whole foreground group, which starts at SIGINT's default.
    proc = subprocess.Popen([str(BIN / "ms4local"), "quantize", str(source), "--type", TYPE, "-o", str(out), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + TIMEOUT
    while not lock_path(out).exists():  # the parent holds the output: llama.cpp's child is starting
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(POLL)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        err = proc.communicate(timeout=TIMEOUT)[1].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "cannot resume" in err and "starts over" in err, err
    assert "resume from the last complete tensor" not in err, err
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_before_the_lock_is_taken_leaves_no_lock_file(tmp_path, monkeypatch):
    """Ctrl-C in the instant between creating `.part.lock` and locking it (what a terminal's Ctrl-C
    right at the start hits): the file goes; one another run holds stays."""
    import fcntl

    from quantize import writer

    real = fcntl.flock
    calls = []

    def interrupted_once(fd, op):
        calls.append(op)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(fd, op)

    monkeypatch.setattr(writer.fcntl, "flock", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "m.gguf"):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer.fcntl, "flock", real)
    # A lock another run holds is never removed by a run interrupted before it could take it.
    with output_lock(tmp_path / "m.gguf"):
        calls.clear()
        monkeypatch.setattr(writer.fcntl, "flock", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            with output_lock(tmp_path / "m.gguf"):
                pass
        assert lock_path(tmp_path / "m.gguf").is_file()
        monkeypatch.setattr(writer.fcntl, "flock", real)
    assert list(tmp_path.iterdir()) == []
