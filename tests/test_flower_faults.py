"""Faults of a real Flower federation (issue 20, run with FEDSAFE_FAULTS=1): processes killed by SIGKILL, nodes that die, come back
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
# minutes of live Flower processes each (3 and 7 here): opt-in, so that the default suite stays fast
FAULTS = pytest.mark.skipif(os.environ.get("FEDSAFE_FAULTS") != "1",
                            reason="minutes of a live Flower federation: set FEDSAFE_FAULTS=1 (see RELIABILITY.md)")


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
@FAULTS
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


# --------------------------------------------------------------------------------------------- Deployment on loopback
HOSTILE = """\
# sitecustomize of a hostile SuperNode (tests/test_flower_faults.py): its flwr-clientapp trains honestly,
# then sends nine extra copies of the adapter in round 0 and one array inflated 10x in round 5
import fedsafe.flower.client_app as ca
from flwr.app import Array, ArrayRecord

_honest = ca._train


def _train(msg, context):
    reply = _honest(msg, context)
    rnd, rec = int(msg.content.config_records["config"]["round"]), reply.content.array_records["arrays"]
    if rnd == 0:
        for i in range(9):
            reply.content[f"copy{i}"] = ArrayRecord(rec.to_torch_state_dict())
    elif rnd == 5:
        k = next(iter(rec.keys()))
        a = rec[k]
        rec[k] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data * 10)
    return reply


ca._train = _train
"""
# a normal round of tiny takes 15-45 s here under load (3 s polls, a fresh flwr-clientapp per message that
# loads torch and the model); a slower reply is simply dropped, and the reference below drops it too
ROUND_TIMEOUT_S = 60


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_all(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait(cond, timeout: float, what: str, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None:
            alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@FAULTS
@pytest.mark.integration
@pytest.mark.slow
def test_deployment_faults_on_loopback(tmp_path, procs):
    """A live federation on 127.0.0.1 (insecure SuperLink, 4 SuperNodes, 7 rounds of tiny, 3 clients per
    round, fl.min_clients=2, round-timeout-s=60) meets five faults, one after the other:

    (a) round 1: the SuperNode of sampled client 1 is SIGKILLed -> the round ends within the timeout
        without it, client 1's missing reply recorded;
    (b) it is restarted at once (new node id, same partition-id) -> refused as a duplicate while the
        SuperLink still lists the dead node (if it still does), then takes client 1 over and is aggregated;
    (c) round 3: client 2's flwr-clientapp is frozen (SIGSTOP) past the timeout -> dropped for that round,
        aggregated again in a later round;
    (d) after round 4's checkpoint the SuperLink, the ServerApp and `flwr run` are SIGKILLed; the SuperLink
        is restarted on the same port and database, `flwr run ... resume=true` finishes rounds 5-6;
    (e) client 0's SuperNode is hostile (a sitecustomize on its PYTHONPATH): nine extra adapter copies in
        round 0, one array 10x its size in round 5 -> both refused before decoding, the rounds go on.

    Under load a healthy reply can miss the timeout too; it is dropped like any other, and the reference
    drops it as well. The final adapter equals, bit for bit, an in-process run that drops the same (client, round) updates.
    """
    import torch

    from fedsafe.flower.sim import descendants, flower_bin, free_port, wait_http_ok
    from fedsafe.flower import offline_env
    from fedsafe.pipeline import start_run
    from fedsafe.config import load_config

    port = free_port()
    homes = {n: tmp_path / f"home-{n}" for n in ("link", "cli", "sn0", "sn1", "sn2", "sn3")}
    for h in homes.values():
        h.mkdir()
    env = {n: offline_env(_env(), FLWR_HOME=str(h)) for n, h in homes.items()}
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "sitecustomize.py").write_text(HOSTILE)
    env["sn0"]["PYTHONPATH"] = f"{hostile}{os.pathsep}{env['sn0']['PYTHONPATH']}"
    (homes["cli"] / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')

    def superlink(name: str):
        p = procs.start(name, [flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                               "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db")],
                        env["link"])
        wait_http_ok(f"http://127.0.0.1:{port}/health", p, 60, tmp_path / f"{name}.log")
        return p

    def supernode(i: int, name: str):
        return procs.start(name, [flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                  "--host", "127.0.0.1", "--port", str(free_port()),
                                  "--node-config", f"partition-id={i} num-partitions=4"], env[f"sn{i}"])

    ov = "fl.rounds=7 fl.min_clients=2"
    run_dir = tmp_path / "run"

    def flwr_run(name: str, resume: bool):
        rc = tmp_path / f"{name}.toml"
        rc.write_text(f'fedsafe-config = "tiny"\noverrides = "{ov}"\nrun-dir = "{run_dir}"\nevaluate = false\n'
                      f'node-wait-s = 120\nround-timeout-s = {ROUND_TIMEOUT_S}\nresume = {str(resume).lower()}\n')
        return procs.start(name, [flower_bin("flwr"), "run", str(REPO / "flower-app"), "loop", "--stream",
                                  "--run-config", str(rc)], env["cli"])

    def done_rounds() -> list[int]:
        f = run_dir / "metrics.jsonl"
        return [r["round"] for r in rows(run_dir)] if f.exists() and f.read_text().endswith("\n") else []

    link = superlink("superlink")
    nodes = {i: supernode(i, f"supernode{i}") for i in range(4)}
    runner = flwr_run("flwr-run", resume=False)

    def running():
        assert runner.poll() is None, f"flwr run exited {runner.returncode}:\n{procs.log('flwr-run')[-3000:]}"

    # (a) + (b): round 1 samples clients 1, 2, 3; kill client 1's SuperNode as the round starts, restart it
    _wait(lambda: 0 in done_rounds(), 300, "round 0", running)
    t_kill = time.monotonic()
    victim = [nodes[1].pid, *descendants(nodes[1].pid)]
    _signal_all(victim, signal.SIGKILL)
    nodes[1].wait(timeout=10)
    nodes[1] = supernode(1, "supernode1-restarted")
    _wait(lambda: 1 in done_rounds(), ROUND_TIMEOUT_S + 60, "round 1", running)
    took_a = time.monotonic() - t_kill

    # (c): round 3 samples clients 0, 2, 3; freeze client 2's flwr-clientapp past the timeout
    _wait(lambda: 2 in done_rounds(), 3 * ROUND_TIMEOUT_S + 60, "round 2", running)
    frozen: list[int] = []
    # the flwr-clientapp of round 2 can still be exiting: freeze only one started for round 3
    earlier = set(descendants(nodes[2].pid))

    def freeze() -> bool:
        for p in descendants(nodes[2].pid):
            if p not in earlier and "flwr-clientapp" in _cmd(p):
                frozen.extend([p, *descendants(p)])
                _signal_all(frozen, signal.SIGSTOP)
                return True
        return False

    try:
        _wait(freeze, ROUND_TIMEOUT_S, "client 2's flwr-clientapp in round 3", running)
        _wait(lambda: 3 in done_rounds(), ROUND_TIMEOUT_S + 60, "round 3", running)
    finally:
        _signal_all(frozen, signal.SIGCONT)  # it wakes up after the round closed

    # (d): SIGKILL the SuperLink, its ServerApp and `flwr run` after round 4's checkpoint; restart, resume
    _wait(lambda: (run_dir / "checkpoints" / "round_0004.safetensors.sha256").exists(), ROUND_TIMEOUT_S + 60,
          "round 4's checkpoint", running)
    server_side = [link.pid, *descendants(link.pid), runner.pid, *descendants(runner.pid)]
    _signal_all(server_side, signal.SIGKILL)
    link.wait(timeout=10)
    runner.wait(timeout=10)
    assert json.loads((run_dir / "flower.json").read_text())["status"] == "running"
    killed_after = done_rounds()
    superlink("superlink-restarted")
    runner = flwr_run("flwr-run-resumed", resume=True)
    try:
        runner.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed run did not finish in 600 s:\n" + procs.log("flwr-run-resumed")[-3000:])
    out = procs.log("flwr-run-resumed")
    assert runner.returncode == 0, out[-3000:]

    info = json.loads((run_dir / "flower.json").read_text())
    m = rows(run_dir)
    assert info["status"] == "finished", out[-3000:]
    assert [r["round"] for r in m] == list(range(7)) and [r["round"] for r in info["rounds"]] == list(range(7))
    assert info["resumed_at_round"] == [max(killed_after) + 1] and max(killed_after) == 4
    rej = {r["round"]: r.get("rejected", {}) for r in m}
    # (a) the killed node's reply is missing in round 1, which aggregated the other two within the timeout
    assert "no reply" in rej[1]["1"] or "unavail" in rej[1]["1"], rej[1]
    # a round's time also covers the partition-id query of a newly seen node (the restarted one)
    assert "1" not in m[1].get("client_weights", {}) and m[1]["round_seconds"] <= ROUND_TIMEOUT_S + 30
    # (b) the restarted SuperNode holds client 1 under a new node id and is aggregated again
    old = info["rounds"][1]["nodes"]["1"]
    back = [r["round"] for r in info["rounds"] if r["nodes"].get("1") not in (None, old)
            and "1" in m[r["round"]].get("client_weights", {})]
    assert back, info["rounds"]
    # (c) the frozen node is dropped in round 3 and aggregated again later
    assert "no reply" in rej[3]["2"] and m[3]["round_seconds"] <= ROUND_TIMEOUT_S + 30
    assert any("2" in m[r].get("client_weights", {}) for r in (4, 6)), rej
    # (e) the hostile node's oversized replies were refused before anything was decoded
    assert "unexpected record(s) ['copy0'" in rej[0]["0"] and "bytes for shape" in rej[5]["0"], rej
    assert all("before decoding" in rej[r]["0"] for r in (0, 5))
    # (d) + the whole run: an in-process run dropping the same updates ends with the same adapter
    drop = {(int(c), rnd) for rnd, r in rej.items() for c in r}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = start_run(load_config("tiny", ov.split()), tmp_path / "ref", progress=False, evaluate=False,
                        update_hook=lambda cid, rnd, sd: None if (cid, rnd) in drop else sd)
    finally:
        torch.set_num_threads(threads)
    assert [r.get("rejected", {}).keys() for r in rows(ref)] == [r.keys() for r in rej.values()]
    _same_bits(run_dir, ref)
    print(f"faults: (a) round 1 took {took_a:.0f} s after the kill; rejected per round "
          f"{ {k: sorted(v) for k, v in rej.items() if v} }; client 1 back in rounds {back}; "
          f"(d) killed after rounds {killed_after}")
