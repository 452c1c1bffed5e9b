"""The fedsafe ``ClientApp``: one SuperNode = one fedsafe client (Flower Message API, flwr >= 1.20).

Which client a SuperNode is comes from its node config, ``partition-id`` (set automatically by Flower's
Simulation Engine; ``flower-supernode --node-config "partition-id=N"`` in a deployment). Whether that
client is benign or malicious, and what data it holds, comes from the fedsafe configuration named by
the run config (``fedsafe-config`` + ``overrides``): its ``data.groups`` assign client ids to groups,
exactly as in the in-process engine. So client N trains on the same records, with the same seeds, in
Flower as in ``fedsafe run``; the malicious clients of the paper's attack (Ye et al., ICLR 2025, §4)
simply fine-tune on unaligned data.

Messages (sent by :class:`fedsafe.flower.strategy.FedsafeStrategy`):

* ``query``: replies ``ConfigRecord({"partition-id": N})`` so the server can map node ids to client
  ids; a missing or malformed node config is answered with an error reply, which the server reports
  by node id.
* ``train``: ``content["arrays"]`` is the global LoRA adapter (peft state-dict keys),
  ``content["config"]`` carries ``round`` (0-based fedsafe round), ``lr`` and ``client-id``; for SCAFFOLD
  ``content["scaffold"]["correction"]`` is the client's ``c - c_i``. The client loads the global adapter
  into its engine, runs :meth:`fedsafe.fl.engine.Engine.client_update`, and replies with the adapter
  (``ArrayRecord``) and ``MetricRecord({"num-examples", "train_loss", "tokens", "seconds"})``.

The base model and tokenised data are cached per process (keyed by the resolved config), so a
simulation actor loads the model once. In a deployment, Flower starts a fresh ``flwr-clientapp``
process per message, so each round pays the model load there.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import RunConfig
from ..errors import FedsafeError
from ..fl.engine import Engine
from . import check_supported, load_run_cfg

app = ClientApp()
log = logging.getLogger("fedsafe.flower.client")

#: ``Error.code`` of fedsafe's error replies (Flower's CLIENT_APP_RAISED_EXCEPTION).
ERROR_CODE = 2

_ENGINES: dict[str, object] = {}


class NodeConfigError(FedsafeError):
    """The SuperNode's node config does not say which fedsafe client it holds."""


def partition_id(node_config, num_clients: int) -> int:
    """The client id a SuperNode holds, from ``node_config["partition-id"]`` (checked)."""
    if "partition-id" not in node_config:
        keys = ", ".join(sorted(node_config)) or "none"
        raise NodeConfigError(f"node config has no partition-id (keys: {keys}); start the SuperNode with "
                              f"--node-config \"partition-id=N\" with 0 <= N < {num_clients}")
    raw = node_config["partition-id"]
    if isinstance(raw, bool):
        raise NodeConfigError(f"node config partition-id={raw!r} is not an integer")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise NodeConfigError(f"node config partition-id={raw!r} is not an integer") from None
    if not isinstance(raw, int):
        raise NodeConfigError(f"node config partition-id={raw!r} is not an integer")
    if not 0 <= raw < num_clients:
        raise NodeConfigError(f"node config partition-id={raw} is out of range: the fedsafe config has "
                              f"{num_clients} clients (0..{num_clients - 1})")
    n = node_config.get("num-partitions")
    if n is not None and not isinstance(n, bool) and isinstance(n, (int, float)) and int(n) != num_clients:
        raise NodeConfigError(f"node config num-partitions={n} but the fedsafe config has {num_clients} clients")
    return raw


def client_engine(cfg: RunConfig) -> Engine:
    """An :class:`~fedsafe.fl.engine.Engine` for training only (no monitor, no server-side pieces), cached."""
    from ..config import dump_yaml
    from ..pipeline import build_engine

    key = dump_yaml(cfg)
    eng = _ENGINES.get(key)
    if eng is None:
        # clients never aggregate, monitor or defend: a plain rule and no in-training defense avoid building
        # server-only state (FLTrust's root data, probe sets, defense data); local training reads none of it
        ccfg = dataclasses.replace(cfg, fl=dataclasses.replace(cfg.fl, aggregator="mean", aggregator_params={}),
                                   defense=dataclasses.replace(cfg.defense, every_rounds=0))
        eng = build_engine(ccfg, Path(tempfile.gettempdir()) / "fedsafe-flower-client", progress=False,
                           round_callback=None)
        _ENGINES.clear()  # one federation per process at a time (the runtime caches one base model anyway)
        _ENGINES[key] = eng
    return eng


def record_to_state_dict(rec) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` -> ``{key: tensor}`` (copies; raises ``ValueError`` with a reason when malformed)."""
    if not isinstance(rec, ArrayRecord):
        raise ValueError(f"expected an ArrayRecord, got {type(rec).__name__}")
    out = {}
    for k, arr in rec.items():
        try:
            a = np.array(arr.numpy(), copy=True)
            out[k] = torch.from_numpy(a)
        except Exception as e:  # noqa: BLE001 - any decoding problem is a malformed array
            raise ValueError(f"array {k!r} cannot be decoded ({type(e).__name__}: {e})") from None
    return out


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which fedsafe client this SuperNode holds (or why it cannot)."""
    try:
        cfg = load_run_cfg(context.run_config)
        cid = partition_id(context.node_config, cfg.num_clients)
    except FedsafeError as e:
        return error_reply(msg, f"fedsafe: {e}")
    return Message(RecordDict({"config": ConfigRecord({"partition-id": cid, "num-clients": cfg.num_clients})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local LoRA training of client ``partition-id`` from the received global adapter."""
    try:
        return _train(msg, context)
    except FedsafeError as e:
        return error_reply(msg, f"fedsafe: {e}")
    except Exception as e:  # noqa: BLE001 - report by node id instead of crashing the SuperNode
        log.exception("fedsafe ClientApp failed")
        return error_reply(msg, f"fedsafe: {type(e).__name__}: {e}")


def _train(msg: Message, context: Context) -> Message:
    from ..fl.server_opt import ScaffoldState

    cfg = load_run_cfg(context.run_config)
    check_supported(cfg)
    cid = partition_id(context.node_config, cfg.num_clients)
    conf = msg.content.config_records.get("config")
    if conf is None or "round" not in conf or "lr" not in conf:
        raise FedsafeError("train message has no ConfigRecord 'config' with 'round' and 'lr'")
    want = conf.get("client-id")
    if want is not None and int(want) != cid:
        raise NodeConfigError(f"the server sent the task of client {want} but this node holds partition-id {cid}")
    rnd, lr = int(conf["round"]), float(conf["lr"])
    eng = client_engine(cfg)
    try:
        sd = record_to_state_dict(msg.content.array_records.get("arrays"))
        eng.global_vec = eng.rt.handle.flat_from_state_dict(sd)
    except ValueError as e:
        raise FedsafeError(f"global adapter from the server is malformed: {e}") from None
    if eng.scaffold is not None:
        rec = msg.content.array_records.get("scaffold")
        if rec is None or "correction" not in rec:
            raise FedsafeError("fl.fed_alg=scaffold but the train message has no scaffold correction")
        corr = record_to_state_dict(rec)["correction"].reshape(-1).float()
        eng.scaffold = ScaffoldState(c=corr)  # correction(cid) = c - c_i, computed by the server
    out, m = eng.client_update(cid, rnd, lr)
    metrics = MetricRecord({"num-examples": int(eng.sizes[cid]), "train_loss": float(m["loss"]),
                            "tokens": int(m["tokens"]), "seconds": float(m["seconds"]), "partition-id": cid})
    return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)
