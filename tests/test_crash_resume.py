"""Crash-resume: SIGKILL real ``fedsafe`` processes mid-way, resume, and demand bit-identical results.

Three workflows, killed and compared with an uninterrupted twin, plus disk-level damage:

* ``fedsafe run tiny fl.rounds=6 fl.local_steps=8`` killed three times (the moment round 0's metrics line appears, which
  is *before* its checkpoint is written, then at random short delays after rounds 2 and 4), resumed with
  ``fedsafe run --resume``: the final adapter must be ``torch.equal`` to the uninterrupted run's and
  ``metrics.jsonl`` / ``forensics.jsonl`` must hold rounds 0..5 exactly once;
* ``fedsafe defend`` killed mid fine-tune, rerun with the same ``--out``: same final adapter, every
  step's metrics line exactly once;
* ``fedsafe sweep tiny --grid fl.rounds=1,8`` killed inside the second cell, rerun: both cells complete,
  the finished cell not recomputed (its ``results.json`` and adapter keep their mtime);
* a finished run directory damaged on disk (newest checkpoint bit-flipped, older sidecars missing or
  empty, stray temp files, a torn metrics line) resumes from the newest checkpoint that verifies and
  again ends bit-identical.

A SIGKILL cannot be aimed at the checkpoint write itself without changing engine code, so the kills
poll the metrics file every 5 ms and fire at random short delays; the delay-0 kill lands between the
metrics append and the end of the checkpoint write, sometimes inside the write (a ``.round_0000.safetensors.*.tmp``
left behind), and the damage test covers the states such a kill can leave.

Kill delays are random but seeded (``FEDSAFE_CRASH_SEED``, default 0) and printed, so a failure can be
replayed. Every subprocess runs with one intra-op thread (``OMP_NUM_THREADS=1``) so the interrupted and
reference processes can run side by side on two cores; both use the same setting, which is what the
bit-for-bit comparison needs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SEED = int(os.environ.get("FEDSAFE_CRASH_SEED", "0"))
ROUNDS = 6
LOCAL_STEPS = 8  # tiny's 2 steps make a round ~0.1 s on one thread; 8 gives kills a window of ~0.5 s per round
RUN_ARGS = ["tiny", f"fl.rounds={ROUNDS}", f"fl.local_steps={LOCAL_STEPS}", "eval.max_new_tokens=4"]
DEFEND_STEPS = 20  # tiny preset: defense.checkpoint_every=2 -> a metrics line + checkpoint every 2 steps
TIMEOUT = 300  # per subprocess; generous for a loaded shared machine


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.pop("FEDSAFE_DEBUG", None)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             FEDSAFE_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONHASHSEED="0")
    return e


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "fedsafe.cli", *map(str, args)]


def start(args, env, cwd) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, what: str) -> str:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{what}: timed out after {TIMEOUT}s\n{err[-3000:]}")
    assert p.returncode == 0, f"{what}: exit {p.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    return out


def run_ok(args, env, cwd, what: str) -> str:
    return finish(start(args, env, cwd), what)


def jsonl_rows(path: Path) -> list[dict]:
    """Complete lines only (a line being appended right now is ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is not complete yet
        if line.strip():
            rows.append(json.loads(line))
    return rows


def kill_when(p: subprocess.Popen, ready, delay: float, what: str, poll: float = 0.005) -> bool:
    """SIGKILL ``p`` ``delay`` seconds after ``ready()`` first holds. Returns False when the process ended
    on its own first (then there was nothing to kill: the caller decides whether that is acceptable)."""
    t_end = time.monotonic() + TIMEOUT
    while not ready():
        if p.poll() is not None:
            out, err = p.communicate()
            assert p.returncode == 0, f"{what}: died before the kill point (exit {p.returncode})\n{err[-4000:]}"
            return False
        if time.monotonic() > t_end:
            p.kill()
            pytest.fail(f"{what}: kill point never reached")
        time.sleep(poll)
    if delay:
        time.sleep(delay)
    alive = p.poll() is None
    if alive:
        os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    if alive:
        assert p.returncode == -signal.SIGKILL, f"{what}: expected death by SIGKILL, got {p.returncode}"
    return alive


def adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "final_adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    sa, sb = adapter(a), adapter(b)
    assert sorted(sa) == sorted(sb)
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} adapter tensors differ after resume, e.g. {diff[0]}"


def ckpt_state(d: Path, rnd: int) -> str:
    """What a kill left of checkpoint ``rnd``: complete / partial (file without a valid sidecar) / absent."""
    from fedsafe.fl import checkpoint

    p = checkpoint.ckpt_path(d, rnd)
    if checkpoint.is_complete(p):
        return "complete"
    tmp = list(p.parent.glob(f".{p.name}.*.tmp")) if p.parent.exists() else []
    return "partial" if p.exists() or tmp else "absent"


def stray_tmp(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*.tmp")) if d.exists() else []


def run_in_background(args, env, cwd, what):
    """Start a subprocess and collect it on a thread; ``join()`` waits and returns its stdout (or raises
    the failure), ``join.proc`` is the process."""
    box: dict = {}
    p = start(args, env, cwd)

    def wait():
        try:
            box["out"] = finish(p, what)
        except BaseException as e:  # pytest.fail / AssertionError, re-raised in the test thread
            box["err"] = e

    t = threading.Thread(target=wait, daemon=True)
    t.start()

    def join():
        t.join(TIMEOUT + 30)
        if "err" in box:
            raise box["err"]
        return box.get("out", "")

    join.proc = p
    return join


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, env):
    """The uninterrupted twin, started once; the run test and the defend test both need it."""
    base = tmp_path_factory.mktemp("ref")
    d = base / "run"
    join = run_in_background(["run", *RUN_ARGS, "--run-dir", d, "--quiet", "--no-eval"], env, base, "reference run")
    yield d, join
    if join.proc.poll() is None:  # a test failed before waiting for it
        join.proc.kill()


# ------------------------------------------------------------------------------------------- tests


def test_run_killed_three_times_resumes_bit_identical(tmp_path, env, reference_run):
    ref_dir, ref_join = reference_run
    rng = random.Random(SEED)
    d = tmp_path / "run"
    metrics = d / "metrics.jsonl"
    log = []
    # Kill points: (round whose metrics line triggers the kill, delay after it appears). Delay 0 lands
    # between the metrics append and the end of that round's checkpoint write (the line is written
    # first); random delays land in the next round's client training or in the checkpoint write.
    plan = [(0, 0.0), (2, rng.uniform(0.0, 0.5)), (4, rng.uniform(0.0, 0.5))]
    p = start(["run", *RUN_ARGS, "--run-dir", d, "--quiet", "--no-eval"], env, tmp_path)
    killed, seen_max = 0, -1
    for i, (rnd, delay) in enumerate(plan):
        # Only a line this process wrote may trigger the kill: lines left from before the last kill go
        # up to seen_max at most (a resume keeps or drops them, and writes only rounds after its checkpoint).
        rnd = max(rnd, seen_max + 1)
        if rnd >= ROUNDS:
            break
        hit = kill_when(p, lambda r=rnd: any(x.get("round") == r for x in jsonl_rows(metrics)), delay,
                        f"kill {i} (round {rnd})")
        if not hit:  # it finished before this kill point: nothing left to interrupt
            log.append({"kill": i, "after_round": rnd, "delay_s": round(delay, 3), "note": "process finished first"})
            break
        killed += 1
        rows = jsonl_rows(metrics)
        seen_max = max([r["round"] for r in rows], default=-1)
        log.append({"kill": i, "after_round": rnd, "delay_s": round(delay, 3),
                    "metrics_rounds": [r["round"] for r in rows],
                    "ckpt_of_that_round": ckpt_state(d, rnd), "stray_tmp": stray_tmp(d),
                    "final_adapter": (d / "final_adapter").exists()})
        p = start(["run", "--resume", d, "--quiet", "--no-eval"], env, tmp_path)
    if p.returncode is None:  # the last resume, not killed: let it finish
        finish(p, "final resume")
    print(f"FEDSAFE_CRASH_SEED={SEED} kills:", json.dumps(log))
    assert killed >= 2, f"only {killed} kill(s) landed mid-run; log: {log}"

    ref_join()
    assert_same_adapter(ref_dir, d)
    for f in ("metrics.jsonl", "forensics.jsonl"):
        rounds = [r["round"] for r in jsonl_rows(d / f)]
        assert rounds == list(range(ROUNDS)), f"{f}: {rounds} (kills: {log})"
        # the whole file parses (no torn line left behind)
        assert (d / f).read_text().endswith("\n")
    ref_rows, rows = jsonl_rows(ref_dir / "metrics.jsonl"), jsonl_rows(d / "metrics.jsonl")
    for a, b in zip(ref_rows, rows):  # same clients, losses and aggregate every round, not just at the end
        for k in ("sampled", "client_loss", "client_weights", "agg_norm", "train_loss", "lr"):
            assert a[k] == b[k], (a["round"], k)


def test_defend_killed_midway_resumes_bit_identical(tmp_path, env, reference_run, request):
    ref_dir, ref_join = reference_run
    ref_join()  # the source run must be finished
    rng = random.Random(SEED + 1)
    full, part = tmp_path / "defend_full", tmp_path / "defend_part"
    args = ["defend", ref_dir, "--steps", DEFEND_STEPS, "--quiet", "--out"]
    join_full = run_in_background(args + [full], env, tmp_path, "uninterrupted defend")
    request.addfinalizer(lambda: join_full.proc.poll() is None and join_full.proc.kill())
    delay = rng.uniform(0.0, 0.1)
    p = start(args + [part], env, tmp_path)
    hit = kill_when(p, lambda: any(r.get("step", 0) >= 4 for r in jsonl_rows(part / "metrics.jsonl")), delay,
                    "defend kill")
    steps_at_kill = [r["step"] for r in jsonl_rows(part / "metrics.jsonl")]
    print(f"FEDSAFE_CRASH_SEED={SEED} defend kill: delay {delay:.3f}s, steps logged {steps_at_kill}, "
          f"stray tmp {stray_tmp(part)}")
    assert hit, "defend finished before the kill point"
    assert max(steps_at_kill) < DEFEND_STEPS and not (part / "final_adapter").exists(), "killed after training"
    run_ok(args + [part], env, tmp_path, "defend rerun")
    join_full()
    assert_same_adapter(full, part)
    steps = [r["step"] for r in jsonl_rows(part / "metrics.jsonl")]
    assert steps == list(range(2, DEFEND_STEPS + 1, 2)), steps
    a, b = json.loads((full / "results.json").read_text()), json.loads((part / "results.json").read_text())
    assert a["refusal"]["rate"] == b["refusal"]["rate"]


def test_resume_skips_corrupt_checkpoints_and_torn_files(tmp_path, env, reference_run):
    """Disk-level damage instead of a kill: the newest checkpoint bit-flipped, the one before without its
    sidecar, the one before that with an empty sidecar, stray temp files, a torn metrics line. Resume
    must fall back to the newest checkpoint that verifies (round 2) and still end bit-identical."""
    import shutil

    from fedsafe.fl.checkpoint import ckpt_path, sidecar

    ref_dir, ref_join = reference_run
    ref_join()
    d = tmp_path / "run"
    shutil.copytree(ref_dir, d)
    shutil.rmtree(d / "final_adapter")
    (d / "train_summary.json").unlink()
    p5 = ckpt_path(d, 5)
    b = bytearray(p5.read_bytes())
    b[len(b) // 2] ^= 0x01  # one bit: size unchanged, the tensors might even decode
    p5.write_bytes(bytes(b))
    sidecar(ckpt_path(d, 4)).unlink()  # killed between the data file and its sidecar
    sidecar(ckpt_path(d, 3)).write_text("")  # sidecar torn
    (d / "checkpoints" / ".round_0006.safetensors.x1y2z3.tmp").write_bytes(b"partial")  # an interrupted atomic write
    (d / ".metrics.jsonl.tmp").write_bytes(b"{")
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"round": 5, "lr": 0.000')  # torn append
    run_ok(["run", "--resume", d, "--quiet", "--no-eval"], env, tmp_path, "resume after corruption")
    assert_same_adapter(ref_dir, d)
    assert [r["round"] for r in jsonl_rows(d / "metrics.jsonl")] == list(range(ROUNDS))
    assert [r["round"] for r in jsonl_rows(d / "forensics.jsonl")] == list(range(ROUNDS))
    from fedsafe.fl import checkpoint

    assert all(checkpoint.is_complete(ckpt_path(d, r)) for r in range(ROUNDS))


@pytest.mark.slow
def test_sweep_killed_in_second_cell_resumes_without_recomputing(tmp_path, env):
    rng = random.Random(SEED + 2)
    s = tmp_path / "sweep"
    # cell 2 runs many rounds so that the kill (polled, after its first round) always lands inside it
    args = ["sweep", "tiny", f"fl.local_steps={LOCAL_STEPS}", "eval.max_new_tokens=4", "--grid", "fl.rounds=1,8",
            "--out", s, "--quiet"]
    c1, c2 = s / "cells" / "fl.rounds=1_seed0", s / "cells" / "fl.rounds=8_seed0"
    delay = rng.uniform(0.0, 0.2)
    p = start(args, env, tmp_path)
    hit = kill_when(p, lambda: (c1 / "results.json").exists() and bool(jsonl_rows(c2 / "metrics.jsonl")), delay,
                    "sweep kill")
    print(f"FEDSAFE_CRASH_SEED={SEED} sweep kill: delay {delay:.3f}s, cell-2 rounds "
          f"{[r['round'] for r in jsonl_rows(c2 / 'metrics.jsonl')]}, stray tmp {stray_tmp(s)}")
    assert hit, "sweep finished before the kill point"
    assert not (c2 / "results.json").exists()
    stamp = {f: (c1 / f).stat().st_mtime_ns for f in ("results.json", "final_adapter/adapter_model.safetensors",
                                                       "metrics.jsonl")}
    run_ok(args, env, tmp_path, "sweep rerun")
    for f, t in stamp.items():
        assert (c1 / f).stat().st_mtime_ns == t, f"finished cell recomputed: {f} rewritten"
    for c, r in ((c1, 1), (c2, 8)):
        assert (c / "results.json").exists() and (c / "label.txt").exists()
        assert [x["round"] for x in jsonl_rows(c / "metrics.jsonl")] == list(range(r))
    assert json.loads((s / "failures.json").read_text()) == {}
    assert (s / "report" / "table.md").exists()
