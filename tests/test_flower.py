"""The Flower engine (fedsafe.flower): equivalence with the in-process engine, bad input, deployment.

Fast tests drive the ServerApp logic with an in-process grid (no Ray, no SuperLink). The integration
tests run Flower's Simulation Engine (``flwr run`` on a private ``flower-superlink --simulation``) and a
real deployment on 127.0.0.1 (SuperLink with TLS and SuperNode authentication, two SuperNodes, one with
an unregistered key that must be refused). Every process they start is stopped by PID.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedsafe.config import load_config  # noqa: E402
from fedsafe.errors import FedsafeError  # noqa: E402
from fedsafe.flower import APP_PYPROJECT, OFFLINE_ENV, offline_env, parse_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_certs.sh"
APP_DIR = REPO / "flower-app"


# --------------------------------------------------------------------------------------------- helpers
class LocalGrid(Grid):
    """A Grid that hands each message to the ClientApp in this process (node ``1000 + i`` has
    ``node_configs[i]``); ``drop`` lists nodes whose train replies get lost."""

    def __init__(self, client_app, node_configs, run_config, drop=()):
        self.client_app = client_app
        self.nodes = {1000 + i: dict(nc) for i, nc in enumerate(node_configs)}
        self.drop = set(drop)
        self.ctx = {n: Context(run_id=1, node_id=n, node_config=nc, state=RecordDict(), run_config=run_config)
                    for n, nc in self.nodes.items()}
        self.sent: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise AttributeError("no run")

    def create_message(self, *a, **k):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(m)
            if m.metadata.message_type == "train" and m.metadata.dst_node_id in self.drop:
                continue
            out.append(self.client_app(m, self.ctx[m.metadata.dst_node_id]))
        return out


@pytest.fixture
def task_identity():
    """Messages created outside a Flower runtime need a task identity (Flower sets it in its processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def adapter(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "final_adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> float:
    x, y = adapter(a), adapter(b)
    assert sorted(x) == sorted(y)
    diff = max(float((x[k] - y[k]).abs().max()) for k in x)
    assert diff <= atol, f"adapters differ by {diff}"
    return diff


def rows(d: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(d) / name).read_text().splitlines() if line.strip()]


def in_process(tmp_path: Path, config: str, overrides: list[str], name: str = "inproc") -> Path:
    from fedsafe.pipeline import start_run

    return start_run(load_config(config, overrides), tmp_path / name, progress=False, evaluate=False)


# --------------------------------------------------------------------------------------------- units
def test_core_does_not_import_flower():
    code = ("import sys, fedsafe, fedsafe.cli, fedsafe.pipeline, fedsafe.flower, fedsafe.flower.sim; "
            "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_app_pyproject_matches_and_builds():
    assert tomllib.loads((APP_DIR / "pyproject.toml").read_text()) == tomllib.loads(APP_PYPROJECT)
    app = tomllib.loads(APP_PYPROJECT)["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedsafe.flower.server_app:app",
                                 "clientapp": "fedsafe.flower.client_app:app"}
    assert tomllib.loads(APP_PYPROJECT)["project"]["dependencies"] == []
    from flwr.cli.build import build_fab_from_disk

    assert len(build_fab_from_disk(APP_DIR)) > 0  # what `flwr run flower-app ...` sends


def test_overrides_roundtrip():
    from fedsafe.flower import join_overrides

    ov = ["fl.rounds=2", "data.groups=[{name: a, clients: 2, mix: {tiny: 1.0}}]"]
    assert parse_overrides(join_overrides(ov)) == ov
    assert parse_overrides("") == [] and parse_overrides("fl.rounds=3 fl.lr=0.1") == ["fl.rounds=3", "fl.lr=0.1"]


@pytest.mark.parametrize("node_config,needle", [
    ({}, "no partition-id"),
    ({"partition-id": "abc"}, "not an integer"),
    ({"partition-id": True}, "not an integer"),
    ({"partition-id": 4}, "out of range"),
    ({"partition-id": -1}, "out of range"),
    ({"partition-id": 1, "num-partitions": 7}, "num-partitions=7"),
])
def test_partition_id_rejects_bad_node_config(node_config, needle):
    from fedsafe.flower.client_app import NodeConfigError, partition_id

    with pytest.raises(NodeConfigError, match=needle):
        partition_id(node_config, 4)


def test_partition_id_accepts():
    from fedsafe.flower.client_app import partition_id

    assert partition_id({"partition-id": 2, "num-partitions": 4}, 4) == 2
    assert partition_id({"partition-id": "3"}, 4) == 3


def test_unsupported_settings_are_clear():
    from fedsafe.flower import check_supported

    with pytest.raises(FedsafeError, match="reset_optimizer"):
        check_supported(load_config("tiny", ["fl.reset_optimizer=false"]))
    check_supported(load_config("tiny", ["fl.fed_alg=scaffold"]))


def test_offline_env():
    env = offline_env({"PATH": "/bin"}, FLWR_HOME="/x")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["FLWR_HOME"] == "/x" and env["PATH"] == "/bin"
    assert set(OFFLINE_ENV) <= set(env)


# --------------------------------------------------------------------------------------------- ServerApp logic, in-process grid
@pytest.mark.parametrize("overrides", [
    ["fl.rounds=2"],
    ["fl.rounds=2", "fl.fed_alg=scaffold", "fl.aggregator=median"],
    ["fl.rounds=2", "fl.fed_alg=fedadam", "fl.server_lr=0.01", "attack.behaviour=scale", "fl.aggregator=foolsgold",
     "fl.sample_clients=3", "fl.aggregate_on=weights"],
])
def test_server_app_equals_in_process(tmp_path, task_identity, overrides):
    """Same sampled clients, seeds, aggregation and run directory as `fedsafe run` (bit-identical here)."""
    from fedsafe.flower import client_app, server_app

    ref = in_process(tmp_path, "tiny", overrides)
    rc = {"fedsafe-config": "tiny", "overrides": " ".join(overrides)}
    grid = LocalGrid(client_app.app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], rc)
    d = server_app.run_server(grid, load_config("tiny", overrides), tmp_path / "flower", evaluate=False)
    assert assert_same_adapter(d, ref, atol=1e-6) == 0.0
    for a, b in zip(rows(d), rows(ref)):
        for k in ("round", "lr", "sampled", "malicious", "client_loss", "client_weights", "agg_norm", "train_loss"):
            assert a[k] == b[k], k
    assert [r["clients"] for r in rows(d, "forensics.jsonl")] == [r["clients"] for r in rows(ref, "forensics.jsonl")]
    for f in ("config.yaml", "clients.json", "data_manifest.json"):
        assert (d / f).read_text() == (ref / f).read_text()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == sorted(p.name for p in (ref / "checkpoints").iterdir())
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "finished" and info["nodes"] == {str(i): 1000 + i for i in range(4)}


def test_server_app_monitor_evaluation_and_posthoc_defense(tmp_path, task_identity, capsys):
    """Round monitoring, the final evaluation and the post-hoc defense run on the server as configured, and
    `fedsafe run ... defense.enabled=true` does the same: one `pipeline.finish_run` for both engines."""
    from fedsafe.cli import main
    from fedsafe.flower import client_app, server_app

    ov = ["fl.rounds=2", "monitor.every=1", "defense.enabled=true"]
    grid = LocalGrid(client_app.app, [{"partition-id": i} for i in range(4)],
                     {"fedsafe-config": "tiny", "overrides": " ".join(ov)})
    d = server_app.run_server(grid, load_config("tiny", ov), tmp_path / "flower", evaluate=True)
    assert all("probe_refusal" in r for r in rows(d))
    assert (d / "results.json").exists() and (d / "eval").is_dir()
    info = json.loads((d / "flower.json").read_text())
    defended = Path(info["defense_run"])
    assert info["status"] == "finished" and defended.parent == d.parent
    assert (defended / "final_adapter" / "adapter_model.safetensors").exists() and (defended / "results.json").exists()
    assert json.loads((defended / "defense.json").read_text())["source_run"] == str(d)

    cli_dir = tmp_path / "cli"
    capsys.readouterr()
    assert main(["run", "tiny", *ov, "--run-dir", str(cli_dir), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cli_dir)
    cli_defended = [p for p in tmp_path.iterdir() if p.name.startswith("cli-defense-L1-")]
    assert len(cli_defended) == 1 and str(cli_defended[0]) in " ".join(err.split()).replace(" ", "")
    cli_defended = cli_defended[0]
    assert json.loads((cli_defended / "defense.json").read_text())["source_run"] == str(cli_dir.resolve())
    # the same kinds of metrics rows: the start adapter's probe row (round -1) first, then one per round
    def kinds(run):
        return [(r["round"], r.get("start", False), "probe_refusal" in r) for r in rows(run)]

    assert kinds(d) == kinds(cli_dir) == [(-1, True, True), (0, False, True), (1, False, True)]
    assert rows(d)[0] == rows(cli_dir)[0]
    assert [r["probe_refusal"] for r in rows(d)] == [r["probe_refusal"] for r in rows(cli_dir)]
    assert assert_same_adapter(defended, cli_defended, atol=1e-6) == 0.0
    for a, b in ((d, cli_dir), (defended, cli_defended)):
        ra, rb = (json.loads((x / "results.json").read_text()) for x in (a, b))
        for k in ("refusal", "false_refusal", "ref_nll", "adapter_sha256", "judge"):
            assert ra[k] == rb[k], (a.name, k)
        assert sorted(p.name for p in (a / "eval").iterdir()) == sorted(p.name for p in (b / "eval").iterdir())


def test_bad_node_configs_reported_by_node_id(tmp_path, task_identity):
    """Missing / malformed / duplicate partition-ids: reported by node id, the run goes on without them."""
    from fedsafe.flower import client_app, server_app

    ov = ["fl.rounds=1"]
    ref = in_process(tmp_path, "tiny", ov)
    configs = [{"partition-id": i} for i in range(4)] + [{}, {"partition-id": "x"}, {"partition-id": 1},
                                                         {"partition-id": 9}]
    grid = LocalGrid(client_app.app, configs, {"fedsafe-config": "tiny", "overrides": "fl.rounds=1"})
    d = server_app.run_server(grid, load_config("tiny", ov), tmp_path / "flower", evaluate=False)
    info = json.loads((d / "flower.json").read_text())
    probs = info["node_problems"]
    assert set(probs) == {"1004", "1005", "1006", "1007"}
    assert "no partition-id" in probs["1004"]
    assert "not an integer" in probs["1005"]
    assert "duplicate partition-id 1" in probs["1006"] and "node 1001" in probs["1006"]
    assert "out of range" in probs["1007"]
    assert_same_adapter(d, ref)


def test_missing_client_node_counts_as_rejected(tmp_path, task_identity):
    """No SuperNode for a sampled client: the round aggregates the others and says why."""
    from fedsafe.flower import client_app, server_app

    ov = ["fl.rounds=1", "fl.sample_clients=2"]  # round 0 (seed 0) samples clients 0 and 3
    grid = LocalGrid(client_app.app, [{"partition-id": i} for i in (0, 1, 2)],
                     {"fedsafe-config": "tiny", "overrides": " ".join(ov)})
    d = server_app.run_server(grid, load_config("tiny", ov), tmp_path / "flower", evaluate=False, node_wait_s=0)
    (row,) = rows(d)
    assert row["sampled"] == [0, 3] and row["rejected"] == {"3": "no SuperNode holds partition-id 3"}
    assert list(row["client_weights"]) == ["0"]




class LeavingGrid(LocalGrid):
    """A LocalGrid whose node ``leaves`` disappears (as the SuperLink reports a dead SuperNode) once the
    train replies of round 0 are in."""

    def __init__(self, *a, leaves: int, **k):
        super().__init__(*a, **k)
        self.leaves = leaves

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        out = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.nodes.pop(self.leaves, None)
        return out


def test_restarted_supernode_takes_over_its_partition_once_the_old_node_is_gone(tmp_path, task_identity):
    """A restarted SuperNode (new node id) claiming the partition of a node that is still listed is refused
    as a duplicate; once the SuperLink drops the old node, the new one is asked again and sampled."""
    from fedsafe.flower import client_app, server_app

    ov = ["fl.rounds=2"]  # round 1 samples clients 1, 2, 3
    ref = in_process(tmp_path, "tiny", ov)
    grid = LeavingGrid(client_app.app, [{"partition-id": i} for i in (0, 1, 2, 3, 1)],
                       {"fedsafe-config": "tiny", "overrides": " ".join(ov)}, leaves=1001)
    d = server_app.run_server(grid, load_config("tiny", ov), tmp_path / "flower", evaluate=False)
    info = json.loads((d / "flower.json").read_text())
    assert [r["nodes"].get("1") for r in info["rounds"]] == [None, 1004]
    assert all(not r["rejected"] for r in info["rounds"]) and not info["node_problems"]
    assert info["nodes"]["1"] == 1004
    assert assert_same_adapter(d, ref, atol=0.0) == 0.0


# --------------------------------------------------------------------------------------------- resume
class DyingGrid(LocalGrid):
    """A LocalGrid whose connection dies when the train messages of round ``die_at`` (0-based, counted
    from this grid's first train round) are sent, like a SuperLink or ServerApp host going down."""

    def __init__(self, *a, die_at: int, **k):
        super().__init__(*a, **k)
        self.die_at, self.train_rounds = die_at, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            if self.train_rounds == self.die_at:
                raise ConnectionError("SuperLink unreachable (test)")
            self.train_rounds += 1
        return super().send_and_receive(messages, timeout=timeout)


def _grid(ov, cls=LocalGrid, **k):
    from fedsafe.flower import client_app

    return cls(client_app.app, [{"partition-id": i} for i in range(4)],
               {"fedsafe-config": "tiny", "overrides": " ".join(ov)}, **k)


@pytest.mark.parametrize("overrides", [
    ["fl.rounds=4", "monitor.every=4"],
    ["fl.rounds=4", "fl.fed_alg=fedadam", "fl.server_lr=0.01", "fl.aggregator=foolsgold", "fl.sample_clients=3"],
])
def test_server_app_resume_equals_uninterrupted(tmp_path, task_identity, overrides):
    """The connection dies in round 3 of 4; resume=true continues from the round-2 checkpoint and ends
    bit-identical to an uninterrupted Flower run (server optimiser and FoolsGold state included); the
    start row (round -1, with monitoring) is kept once, as `fedsafe run --resume` keeps it."""
    from fedsafe.flower import server_app

    cfg = load_config("tiny", overrides)
    ref = server_app.run_server(_grid(overrides), cfg, tmp_path / "ref", evaluate=False)
    d = tmp_path / "run"
    with pytest.raises(ConnectionError):
        server_app.run_server(_grid(overrides, DyingGrid, die_at=2), cfg, d, evaluate=False)
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "failed" and len(info["rounds"]) == 2 and not (d / "final_adapter").exists()
    out = server_app.run_server(_grid(overrides), cfg, d, evaluate=False, resume=True)
    assert out == d.resolve()
    assert assert_same_adapter(d, ref, atol=0.0) == 0.0
    monitored = "monitor.every=4" in overrides
    assert [r["round"] for r in rows(d)] == [r["round"] for r in rows(ref)] == [-1] * monitored + [0, 1, 2, 3]
    assert [r.get("probe_refusal") for r in rows(d)] == [r.get("probe_refusal") for r in rows(ref)]
    for a, b in zip(rows(d)[monitored:], rows(ref)[monitored:]):
        for k in ("sampled", "client_loss", "client_weights", "agg_norm", "train_loss", "lr"):
            assert a[k] == b[k], (a["round"], k)
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "finished" and info["resumed_at_round"] == [2]
    assert [r["round"] for r in info["rounds"]] == [0, 1, 2, 3]
    assert info["flwr_version"] and info["federation"] == "deployment"


def test_server_app_resume_refuses_what_differs(tmp_path, task_identity):
    """A resume with another config, federation or Flower version is refused, naming each difference;
    the run directory is left as it was."""
    from fedsafe.flower import server_app
    from fedsafe.flower.resume import identity

    ov = ["fl.rounds=2"]
    d = server_app.run_server(_grid(ov), load_config("tiny", ov), tmp_path / "run", evaluate=False)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    ov2 = ["fl.rounds=3", "fl.aggregator=median"]
    with pytest.raises(FedsafeError, match=r"fl\.aggregator: run 'mean', now 'median'; fl\.rounds: run 2, now 3"):
        server_app.run_server(_grid(ov2), load_config("tiny", ov2), d, evaluate=False, resume=True)
    with pytest.raises(FedsafeError, match="federation: run 'deployment', now 'lab-B'"):
        server_app.run_server(_grid(ov), load_config("tiny", ov), d, evaluate=False, resume=True,
                              ident=identity({"federation": "lab-B"}))
    info = json.loads((d / "flower.json").read_text())
    (d / "flower.json").write_text(json.dumps({**info, "flwr_version": "1.20.0"}))
    with pytest.raises(FedsafeError, match="Flower version: run '1.20.0', now '"):
        server_app.run_server(_grid(ov), load_config("tiny", ov), d, evaluate=False, resume=True)
    (d / "flower.json").write_bytes(before[d / "flower.json"])
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    with pytest.raises(FedsafeError, match="needs run-dir"):
        server_app.run_server(_grid(ov), load_config("tiny", ov), None, evaluate=False, resume=True)
    plain = in_process(tmp_path, "tiny", ov)  # a `fedsafe run` directory has no flower.json
    with pytest.raises(FedsafeError, match="not a Flower run directory"):
        server_app.run_server(_grid(ov), load_config("tiny", ov), plain, evaluate=False, resume=True)


def test_sim_resume_is_checked_before_anything_starts(tmp_path, task_identity):
    """`fedsafe flower sim --resume` refuses a different simulated federation before starting Flower."""
    pytest.importorskip("ray")
    from fedsafe.flower import server_app
    from fedsafe.flower.sim import run_flower_sim

    ov = ["fl.rounds=1"]
    d = server_app.run_server(_grid(ov), load_config("tiny", ov), tmp_path / "run", evaluate=False)
    info = json.loads((d / "flower.json").read_text())
    (d / "flower.json").write_text(json.dumps({**info, "federation": "simulation num_supernodes=4"}))
    before = _sim_processes()
    with pytest.raises(FedsafeError, match="federation: run 'simulation num_supernodes=4', now 'simulation "
                                           "num_supernodes=4 init_args_num_cpus=2'"):
        run_flower_sim(None, [], d, progress=False, resume=True, federation_config=["init_args_num_cpus=2"])
    with pytest.raises(FedsafeError, match="fl.rounds: run 1, now 2"):
        run_flower_sim(None, ["fl.rounds=2"], d, progress=False, resume=True)
    assert _sim_processes() == before


def test_sim_overwrite_keeps_the_old_run_until_the_new_one_starts(tmp_path, monkeypatch):
    """`fedsafe flower sim --overwrite` whose Flower never starts gives the old run back, untouched; without
    --overwrite a non-empty run directory is refused before anything is created."""
    pytest.importorskip("ray")
    from fedsafe.flower import sim

    old = tmp_path / "run"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"round": 0}\n')
    made: list[str] = []
    real_mkdtemp = sim.tempfile.mkdtemp
    monkeypatch.setattr(sim.tempfile, "mkdtemp", lambda **k: made.append(real_mkdtemp(**k)) or made[-1])
    with pytest.raises(FedsafeError, match="already exists and is not empty"):
        sim.run_flower_sim("tiny", [], old, progress=False)

    def no_superlink(name: str) -> str:
        raise FedsafeError(f"`{name}` not found")

    monkeypatch.setattr(sim, "flower_bin", no_superlink)
    with pytest.raises(FedsafeError, match="`flower-superlink` not found"):
        sim.run_flower_sim("tiny", [], old, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no directory left aside
    assert [p.name for p in old.iterdir()] == ["metrics.jsonl"]
    assert (old / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert made and not any(Path(m).exists() for m in made)  # the private work directories are gone


# --------------------------------------------------------------------------------------------- malformed replies
def _malform(kind: str, good: Message) -> Message | None:
    """A reply to the same instruction as ``good`` but broken in one way (None = no reply)."""
    sd = good.content.array_records["arrays"].to_torch_state_dict()
    sd = {k: v.clone() for k, v in sd.items()}
    metrics = MetricRecord({"num-examples": 16, "train_loss": 1.0})
    k0 = next(iter(sd))
    if kind == "error":
        return Message(Error(code=2, reason="boom on the client"), reply_to=_instr(good))
    if kind == "no_reply":
        return None
    if kind == "wrong_shape":
        sd[k0] = torch.zeros(3, 5)
    elif kind == "nan":
        sd[k0][0] = float("nan")
    elif kind == "inf":
        sd[k0][-1] = float("inf")
    elif kind == "missing_key":
        del sd[k0]
    elif kind == "extra_key":
        sd["evil.weight"] = torch.zeros(2)
    elif kind == "int_dtype":
        sd[k0] = sd[k0].to(torch.int64)
    elif kind == "huge_norm":
        sd[k0] = sd[k0] + 1e7
    elif kind == "no_arrays":
        return Message(RecordDict({"metrics": metrics}), reply_to=_instr(good))
    elif kind == "no_metrics":
        return Message(RecordDict({"arrays": ArrayRecord(sd)}), reply_to=_instr(good))
    elif kind in ("ten_times", "extra_records"):  # as large as 10 adapters: in one array, or in more records
        rec = ArrayRecord(sd)
        if kind == "ten_times":
            a = rec[k0]
            rec[k0] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data * 10)
            return Message(RecordDict({"arrays": rec, "metrics": metrics}), reply_to=_instr(good))
        more = RecordDict({"arrays": rec, "metrics": metrics})
        for i in range(9):
            more[f"arrays{i}"] = ArrayRecord({k: v.clone() for k, v in sd.items()})
        return Message(more, reply_to=_instr(good))
    elif kind == "undecodable":
        rec = ArrayRecord(sd)
        rec[k0] = Array(dtype="float32", shape=tuple(sd[k0].shape), stype="numpy.ndarray", data=b"garbage")
        return Message(RecordDict({"arrays": rec, "metrics": metrics}), reply_to=_instr(good))
    else:
        raise AssertionError(kind)
    return Message(RecordDict({"arrays": ArrayRecord(sd), "metrics": metrics}), reply_to=_instr(good))


_INSTR: dict[int, Message] = {}
_GOOD: dict[int, RecordDict] = {}


def _instr(reply: Message) -> Message:
    return _INSTR[reply.metadata.src_node_id]


@pytest.mark.parametrize("kind,needle", [
    ("error", "boom on the client"), ("no_reply", "no reply"), ("wrong_shape", "shape"), ("nan", "non-finite"),
    ("inf", "non-finite"), ("missing_key", "missing 1 adapter"), ("extra_key", "unexpected"),
    ("int_dtype", "dtype"), ("huge_norm", "exceeds fl.max_update_norm"), ("no_arrays", "no ArrayRecord"),
    ("no_metrics", "train_loss"), ("undecodable", "cannot be decoded"),
    ("ten_times", "bytes for shape"), ("extra_records", "unexpected record(s) ['arrays0'"),
])
def test_aggregate_train_drops_malformed_reply(tmp_path, task_identity, kind, needle, monkeypatch):
    """A malformed reply is reported by node id and dropped; the round aggregates the other client. A reply
    with 10x an adapter's bytes (in one array or in extra records) is refused before it is decoded."""
    from fedsafe.pipeline import build_engine
    from fedsafe.rundir import write_run_header
    from fedsafe.flower import client_app, strategy
    from fedsafe.flower.strategy import FedsafeStrategy

    decoded = []
    monkeypatch.setattr(strategy, "record_to_state_dict",
                        lambda rec: decoded.append(rec) or client_app.record_to_state_dict(rec))

    ov = ["fl.rounds=1", "fl.sample_clients=2", "fl.max_update_norm=1000"]
    rc = {"fedsafe-config": "tiny", "overrides": " ".join(ov)}
    cfg = load_config("tiny", ov)
    d = tmp_path / "run"
    d.mkdir()
    eng = build_engine(cfg, d, progress=False)
    write_run_header(cfg, d, eng.fed)
    g0 = eng.global_vec.clone()
    grid = LocalGrid(client_app.app, [{"partition-id": i} for i in range(4)], rc)
    strat = FedsafeStrategy(eng, node_wait_s=0)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in msgs] == [1000, 1003]  # clients 0 and 3 in round 0 (seed 0)
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"t{i}"
        _INSTR[m.metadata.dst_node_id] = m
    good = []
    for m in msgs:  # the clients' honest replies are the same for every kind: train once per module
        node = m.metadata.dst_node_id
        if node not in _GOOD:
            _GOOD[node] = client_app.app(m, grid.ctx[node]).content
        good.append(Message(_GOOD[node], reply_to=m))
    bad = _malform(kind, good[1])
    replies = [good[0]] + ([bad] if bad is not None else [])
    arrays, metrics = strat.aggregate_train(1, replies)
    (row,) = rows(d)
    assert list(row["rejected"]) == ["3"]
    assert row["rejected"]["3"].startswith("node 1003: ") and needle in row["rejected"]["3"], row["rejected"]
    assert list(row["client_weights"]) == ["0"] and metrics["num-rejected"] == 1 and metrics["num-updates"] == 1
    # FedAvg with one kept client: the new global is that client's adapter
    kept = eng.rt.handle.flat_from_state_dict(good[0].content.array_records["arrays"].to_torch_state_dict())
    new = eng.rt.handle.flat_from_state_dict(arrays.to_torch_state_dict())
    assert torch.allclose(new, kept, atol=1e-7) and not torch.equal(new, g0)
    assert strat.report()["rounds"][0]["rejected"]["3"] == row["rejected"]["3"]
    if "before decoding" in row["rejected"]["3"]:
        assert len(decoded) == 1  # only the good reply was decoded into tensors


def test_reply_from_unexpected_node_is_ignored(tmp_path, task_identity):
    from fedsafe.pipeline import build_engine
    from fedsafe.flower import client_app
    from fedsafe.flower.strategy import FedsafeStrategy

    ov = ["fl.rounds=1", "fl.sample_clients=2"]
    rc = {"fedsafe-config": "tiny", "overrides": " ".join(ov)}
    cfg = load_config("tiny", ov)
    d = tmp_path / "run"
    d.mkdir()
    eng = build_engine(cfg, d, progress=False)
    grid = LocalGrid(client_app.app, [{"partition-id": i} for i in range(4)], rc)
    strat = FedsafeStrategy(eng, node_wait_s=0)
    msgs = list(strat.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"t{i}"
    good = [client_app.app(m, grid.ctx[m.metadata.dst_node_id]) for m in msgs]
    stray = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1001, message_type="train")
    stray.metadata.__dict__["_message_id"] = "s"
    stray_reply = Message(good[0].content, reply_to=stray)
    strat.aggregate_train(1, good + [stray_reply, good[0]])
    (row,) = rows(d)
    assert "rejected" not in row and sorted(row["client_weights"]) == ["0", "3"]


def test_deploy_info_cli(tmp_path):
    from typer.testing import CliRunner

    from fedsafe.flower.sim import app

    res = CliRunner().invoke(app, ["deploy-info", "tiny", "--write-app", str(tmp_path / "app")])
    assert res.exit_code == 0, res.output
    assert res.output.count("flower-supernode") == 4 and "partition-id=3" in res.output
    assert "organisation 3: malicious in this config" in res.output and "flower-superlink" in res.output
    assert (tmp_path / "app" / "pyproject.toml").read_text() == APP_PYPROJECT


# --------------------------------------------------------------------------------------------- Simulation Engine
@pytest.mark.integration
def test_flower_sim_equals_in_process(tmp_path):
    """(a) `fedsafe flower sim tiny fl.rounds=2` (Ray, 4 simulated SuperNodes) == `fedsafe run tiny fl.rounds=2`."""
    pytest.importorskip("ray")
    from fedsafe.flower.sim import run_flower_sim

    ov = ["fl.rounds=2"]
    ref = in_process(tmp_path, "tiny", ov)
    before = _sim_processes()
    d = run_flower_sim("tiny", ov, tmp_path / "sim", progress=False, evaluate=True, timeout_s=400)
    assert_same_adapter(d, ref, atol=1e-6)
    for f in ("config.yaml", "clients.json", "metrics.jsonl", "forensics.jsonl", "results.json", "train_summary.json",
              "flower_sim.log"):
        assert (d / f).exists(), f
    assert [r["sampled"] for r in rows(d)] == [r["sampled"] for r in rows(ref)]
    assert [r["client_loss"] for r in rows(d)] == [r["client_loss"] for r in rows(ref)]
    info = json.loads((d / "flower.json").read_text())
    assert info["status"] == "finished" and len(info["nodes"]) == 4 and not info["node_problems"]
    assert all(not r["rejected"] for r in info["rounds"])
    time.sleep(1)
    leaked = {p: _cmdline(p) for p in _sim_processes() - before}
    assert not leaked, f"processes of the simulation still running: {leaked}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _sim_processes() -> set[int]:
    """Live processes started by a run_flower_sim (their FLWR_HOME is its private work directory)."""
    out = set()
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                env = Path(f"/proc/{e}/environ").read_bytes()
                stat = Path(f"/proc/{e}/stat").read_bytes()
            except OSError:
                continue
            if b"fedsafe-flower-sim-" in env and stat.rsplit(b")", 1)[-1].split()[0] != b"Z":
                out.add(int(e))
    return out


# --------------------------------------------------------------------------------------------- Deployment Engine
TWO_CLIENTS = """\
base: tiny
name: tiny-two-orgs
data:
  groups:
    - {name: benign, clients: 1, mix: {tiny: 0.75, "aligned:tiny-harmful": 0.25}}
    - {name: malicious, clients: 1, malicious: true, mix: {tiny-unaligned: 1.0}}
fl:
  rounds: 2
  sample_clients: 2
"""


def _bin(name: str) -> str:
    from fedsafe.flower.sim import flower_bin

    return flower_bin(name)


def _wait_https(url: str, ca: Path, proc: subprocess.Popen, timeout: float, logs: str) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"SuperLink exited with {proc.returncode}"
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not up after {timeout} s")


@pytest.mark.integration
def test_deployment_tls_node_auth(tmp_path, procs):
    """(c) SuperLink (TLS + SuperNode auth) and two SuperNodes on 127.0.0.1, `flwr run` of a 2-org tiny
    federation for 2 rounds; a SuperNode with an unregistered key is refused."""
    from fedsafe.flower.sim import free_port

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(SCRIPT), str(certs), "3"], check=True, timeout=120, capture_output=True)
    port = free_port()
    homes = {n: tmp_path / f"home-{n}" for n in ("link", "cli", "sn0", "sn1", "sn2")}
    for h in homes.values():
        h.mkdir()
    env = {n: offline_env(FLWR_HOME=str(h)) for n, h in homes.items()}
    (homes["cli"] / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    link = procs.start("superlink", [
        _bin("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db")], env["link"])
    _wait_https(f"https://127.0.0.1:{port}/health", certs / "ca.crt", link, 60, procs.log("superlink"))

    def flwr(*args, timeout=120):
        return subprocess.run([_bin("flwr"), *args], env=env["cli"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)

    for i in (0, 1):
        r = flwr("supernode", "register", str(certs / f"supernode-{i}.pub"), "tls")
        assert r.returncode == 0, r.stdout + r.stderr

    def supernode(i: int, key: int):
        return procs.start(f"supernode{i}", [
            _bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt"),
            "--auth-supernode-private-key", str(certs / f"supernode-{key}"), "--host", "127.0.0.1",
            "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"], env[f"sn{i}"])

    supernode(0, 0)
    supernode(1, 1)
    intruder = supernode(2, 2)  # key 2 was never registered
    cfg_file = tmp_path / "two_orgs.yaml"
    cfg_file.write_text(TWO_CLIENTS)
    run_dir = tmp_path / "run"
    run_cfg = tmp_path / "run_config.toml"
    run_cfg.write_text(f'fedsafe-config = "{cfg_file}"\nrun-dir = "{run_dir}"\nevaluate = true\nnode-wait-s = 120\n')
    t0 = time.time()
    r = flwr("run", str(APP_DIR), "tls", "--stream", "--run-config", str(run_cfg), timeout=480)
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    info = json.loads((run_dir / "flower.json").read_text())
    assert info["status"] == "finished", out
    assert sorted(info["nodes"]) == ["0", "1"] and not info["node_problems"]
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "results.json").exists()
    m = rows(run_dir)
    assert [r["round"] for r in m] == [0, 1] and all(sorted(r["client_weights"]) == ["0", "1"] for r in m)
    assert json.loads((run_dir / "clients.json").read_text())["malicious_ids"] == [1]
    # the same federation in-process reaches the same adapter
    ref = in_process(tmp_path, str(cfg_file), [])
    assert_same_adapter(run_dir, ref, atol=1e-6)
    # the SuperNode with the unregistered key was refused
    try:
        code = intruder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    log = procs.log("supernode2")
    assert code not in (None, 0), f"unregistered SuperNode still running / exited 0:\n{log[-2000:]}"
    assert "Failed to activate SuperNode" in log, log[-2000:]
    print(f"deployment: flwr run took {took:.1f} s; unregistered SuperNode exited with {code}")
