"""Faults of a real Flower federation (issue 20): processes killed by SIGKILL, nodes that die, come back
or stall, replies far larger than an adapter. Every process a test starts is stopped by PID (its
process tree, then anything carrying the test's private FLWR_HOME); RELIABILITY.md has the outcomes.

* the Simulation Engine (``fedsafe flower sim``) killed mid-run, then ``--resume``;
* a deployment on 127.0.0.1 (SuperLink + 4 SuperNodes, insecure: TLS is covered by test_flower.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from test_flower import _sim_processes, adapter, rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """The subprocesses' environment: this checkout's fedsafe, one thread (bit-identity across processes)."""
    src = str(REPO / "src")
    pp = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + pp if pp else ""), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def _cli(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsafe.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _same_bits(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert sorted(x) == sorted(y)
    diff = {k: float((x[k] - y[k]).abs().max()) for k in x if not torch.equal(x[k], y[k])}
    assert not diff, f"adapters differ: {diff}"


def _kill_all(pids: set[int]) -> None:
    for p in sorted(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sim_workdirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("fedsafe-flower-sim-*"))


# --------------------------------------------------------------------------------------------- Simulation Engine
@pytest.mark.integration
@pytest.mark.slow
def test_flower_sim_killed_mid_run_resumes_bit_identical(tmp_path):
    """`fedsafe flower sim` (Ray, 4 simulated SuperNodes) is SIGKILLed -- the CLI's process group, the
    SuperLink, its ServerApp and the Ray workers, all at once, like a machine that dies -- right after
    round 1's checkpoint; `fedsafe flower sim --resume` then ends with the adapter of an uninterrupted run
    bit for bit (the uninterrupted simulation equals `fedsafe run` bit for bit at one thread, see
    test_flower_sim_equals_in_process), every round once in metrics.jsonl."""
    pytest.importorskip("ray")
    rounds = 6
    ov = ["tiny", f"fl.rounds={rounds}", "fl.local_steps=8"]
    env = _env()
    ref = tmp_path / "ref"
    r = _cli(["run", *ov, "--run-dir", ref, "--no-eval", "-q"], env, 300)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "sim"
    before, dirs_before = _sim_processes(), _sim_workdirs()
    ck = d / "checkpoints"
    p = subprocess.Popen([sys.executable, "-m", "fedsafe.cli", "flower", "sim", *ov, "--run-dir", str(d), "--no-eval",
                          "-q", "--timeout", "400"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, started = time.monotonic() + 400, set()
        while not (ck / "round_0001.safetensors.sha256").exists():
            assert p.poll() is None, f"flower sim exited with {p.returncode} before round 1: {p.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "round 1 never finished"
            if not started and (ck / "round_0000.safetensors.sha256").exists():
                started = _sim_processes() - before  # SuperLink, ServerApp, Ray: all running by round 0
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)  # the CLI; the SuperLink runs in a session of its own
        _kill_all(started)
    finally:
        for _ in range(50):  # anything that was starting when we looked, by PID
            left = _sim_processes() - before
            if not left and p.poll() is not None:
                break
            _kill_all(left)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.1)
        p.wait(timeout=10)
        p.stderr.close()
        for w in _sim_workdirs() - dirs_before:  # the killed CLI could not remove its work directory
            shutil.rmtree(w, ignore_errors=True)
    assert p.returncode == -signal.SIGKILL
    assert not (_sim_processes() - before)
    done = sorted(int(f.name[6:10]) for f in ck.glob("round_*.safetensors.sha256"))
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "running" and not (d / "final_adapter").exists()
    assert 1 <= max(done) < rounds - 1, f"the kill landed after checkpoints {done}"

    r = _cli(["flower", "sim", "--resume", d, "--no-eval", "-q", "--timeout", "400"], env, 450)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip().splitlines()[-1]) == d.resolve()
    _same_bits(d, ref)
    assert [x["round"] for x in rows(d)] == [x["round"] for x in rows(ref)] == list(range(rounds))
    for a, b in zip(rows(d), rows(ref)):
        for k in ("sampled", "client_loss", "client_weights", "agg_norm", "train_loss", "lr"):
            assert a[k] == b[k], (a["round"], k)
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "finished" and info["resumed_at_round"] == [max(done) + 1]
    assert [x["round"] for x in info["rounds"]] == list(range(rounds))
    assert not (_sim_processes() - before) and not (_sim_workdirs() - dirs_before)
    print(f"killed with checkpoints {done} on disk; resumed at round {max(done) + 1}")
