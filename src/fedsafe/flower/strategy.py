"""``FedsafeStrategy``: fedsafe's server round as a Flower strategy (Message API, flwr >= 1.20).

A subclass of ``flwr.serverapp.strategy.FedAvg`` (McMahan et al. 2017, as implemented in Flower,
Beutel et al. arXiv:2007.14390) that overrides only what fedsafe needs:

* :meth:`configure_train` picks exactly the clients the in-process engine would sample in this round
  (:func:`fedsafe.fl.engine.sample_clients`, seeded by ``(seed, round)``), maps their client ids
  (``partition-id``) to Flower node ids with a ``query`` message to every newly seen node, and sends
  each one the global LoRA adapter, the round's client learning rate (cosine schedule, constant within
  a round, as Ye et al., ICLR 2025) and, for SCAFFOLD, its correction ``c - c_i``. A node whose node
  config is missing or malformed is reported by node id and never sampled.
* :meth:`aggregate_train` checks every reply: an error reply, a missing/undecodable ``ArrayRecord``, a
  reply with extra records or more bytes than the adapter (:func:`check_reply_size`, before decoding), or
  an adapter that fails :func:`fedsafe.fl.updates.validate_state` (keys, shapes, dtype, NaN/Inf, norm)
  is logged by node id and dropped, and the round goes on with the others. The kept updates are then
  aggregated by the server-side :class:`~fedsafe.fl.engine.Engine`'s own ``run_round``: the same robust
  rule (``fedsafe.aggregators.REGISTRY``) on the same deltas from the kept global adapter, the same
  server optimiser (FedAvg/FedAvgM/FedAdam/FedYogi/FedAdagrad, SCAFFOLD control variates), the same
  forensics, monitoring, ``metrics.jsonl`` lines and checkpoints. The clients' replies simply stand in
  for the engine's local ``client_update`` calls, so the result equals the in-process run's.

Flower's federated evaluation is off (``fraction_evaluate=0``): fedsafe evaluates centrally on the
server (round monitor and the final evaluation), as the paper does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..fl.engine import Engine, sample_clients
from ..fl.updates import RejectedUpdate, validate_state
from ..lm import cosine_lr
from .client_app import record_to_state_dict


#: the records a client's train reply may carry (anything else is refused before decoding)
REPLY_RECORDS = frozenset({"arrays", "metrics"})
#: bytes allowed per adapter array beyond 8 per element (float64, refused later by dtype): the .npy header
NPY_SLACK = 1024


def check_reply_size(content: RecordDict, keys: list[str], shapes: list) -> None:
    """Refuse a reply with extra records, unexpected arrays, other declared shapes or more bytes than an
    adapter can take, from the records' metadata and byte counts only: a reply 10x an adapter's size is
    never decoded into tensors. Raises ``RejectedUpdate``."""
    extra = sorted(set(content.keys()) - REPLY_RECORDS)
    if extra:
        raise RejectedUpdate(f"reply has unexpected record(s) {extra[:5]} (allowed: {sorted(REPLY_RECORDS)}); "
                             "refused before decoding")
    rec = content.array_records["arrays"]
    want = {k: tuple(int(d) for d in shape) for k, shape in zip(keys, shapes)}
    unexpected = [k for k in rec.keys() if k not in want]
    if unexpected:
        raise RejectedUpdate(f"reply has {len(unexpected)} unexpected array(s) {unexpected[:3]}; refused before decoding")
    for k, arr in rec.items():
        shape = tuple(int(d) for d in getattr(arr, "shape", ()))
        if shape != want[k]:
            raise RejectedUpdate(f"array {k!r} declares shape {shape}, expected {want[k]}; refused before decoding")
        n = len(getattr(arr, "data", b"") or b"")
        if n > 8 * math.prod(shape) + NPY_SLACK:
            raise RejectedUpdate(f"array {k!r} is {n} bytes for shape {shape}; refused before decoding")


class FedsafeStrategy(FedAvg):
    """Flower strategy that runs fedsafe's rounds on a server-side :class:`~fedsafe.fl.engine.Engine`.

    ``engine`` is built with :func:`fedsafe.pipeline.build_engine` for the run directory; its
    ``global_vec`` is the global adapter (the one kept for deltas), its ``start_round`` the first round
    to run (0, or the next round of a resumed run). ``node_wait_s`` bounds how long the first round
    waits until a SuperNode holds every client id; ``query_timeout_s`` how long a partition-id query may
    take.
    """

    def __init__(self, engine: Engine, *, node_wait_s: float = 120.0, query_timeout_s: float = 300.0,
                 poll_s: float = 1.0) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=0, min_evaluate_nodes=0,
                         min_available_nodes=1)
        self.engine = engine
        self.round_offset = engine.start_round
        self.node_wait_s = float(node_wait_s)
        self.query_timeout_s = float(query_timeout_s)
        self.poll_s = float(poll_s)
        self.cid_to_node: dict[int, int] = {}
        self.node_to_cid: dict[int, int] = {}
        self.node_problems: dict[int, str] = {}  # node id -> why it holds no client
        self.queried: set[int] = set()
        self.claims: dict[int, int] = {}  # node id -> client id it claimed while another live node held it
        self.rounds: list[dict] = []
        # called once a round's report is in ``rounds``, before its metrics line and checkpoint are written
        # (the ServerApp rewrites flower.json there, so a resume after a kill finds every checkpointed round)
        self.on_round: Callable[[], None] | None = None
        self._waited = False
        self._pending: dict | None = None

    # ------------------------------------------------------------------ reporting
    def summary(self) -> None:
        e = self.engine
        log(INFO, "\t├──> fedsafe: %s, %d clients (malicious %s), %d per round, %d rounds",
            e.cfg.name, e.K, e.malicious, e.cfg.fl.sample_clients, e.cfg.fl.rounds)
        log(INFO, "\t└──> aggregator %s on %s, server %s", e.cfg.fl.aggregator, e.cfg.fl.aggregate_on,
            e.cfg.fl.fed_alg)

    def report(self) -> dict:
        """Node mapping and problems, for ``flower.json`` in the run directory."""
        return {
            "nodes": {str(c): n for c, n in sorted(self.cid_to_node.items())},
            "node_problems": {str(n): r for n, r in sorted(self.node_problems.items())},
            "rounds": self.rounds,
        }

    def _problem(self, node: int, reason: str) -> None:
        self.node_problems[node] = reason
        log(WARNING, "fedsafe: node %d: %s", node, reason)

    # ------------------------------------------------------------------ node <-> client id
    def map_nodes(self, grid: Grid, want: Iterable[int] = (), wait_s: float = 0.0) -> list[int]:
        """Query new nodes for their partition-id until every client in ``want`` has a node or ``wait_s``
        passed. Returns the client ids of ``want`` that still have no node."""
        want = list(want)
        deadline = time.monotonic() + wait_s
        last_log = 0.0
        while True:
            nodes = [int(n) for n in grid.get_node_ids()]
            alive = set(nodes)
            for n in [n for n in self.node_to_cid if n not in alive]:  # a node left: free its client id
                cid = self.node_to_cid.pop(n)
                if self.cid_to_node.get(cid) == n:
                    del self.cid_to_node[cid]
                    # a node refused as a duplicate of this client (e.g. the same SuperNode restarted
                    # before the SuperLink saw the old one go) is asked again, and may take it over now
                    self.queried -= {m for m, c in self.claims.items() if c == cid}
            new = [n for n in nodes if n not in self.queried]
            if new:
                self._query(grid, new)
            missing = [c for c in want if c not in self.cid_to_node]
            now = time.monotonic()
            if not missing or now >= deadline:
                return missing
            if now - last_log > 10:
                log(INFO, "fedsafe: waiting for SuperNodes holding partition-id %s (%d nodes connected)",
                    missing, len(nodes))
                last_log = now
            time.sleep(self.poll_s)

    def _query(self, grid: Grid, nodes: list[int]) -> None:
        msgs = [Message(RecordDict({"config": ConfigRecord({"fedsafe": "partition-id"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
        replies = list(grid.send_and_receive(msgs, timeout=self.query_timeout_s))
        answered = set()
        for msg in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
            n = int(msg.metadata.src_node_id)
            answered.add(n)
            self.queried.add(n)
            if msg.has_error():
                self._problem(n, f"bad node config: {msg.error.reason}")
                continue
            try:
                conf = msg.content.config_records["config"]
                cid = conf["partition-id"]
                if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < self.engine.K:
                    raise ValueError(f"partition-id {cid!r} is not a client id in 0..{self.engine.K - 1}")
            except (KeyError, ValueError, TypeError) as e:
                self._problem(n, f"malformed partition-id reply ({e})")
                continue
            holder = self.cid_to_node.get(cid)
            if holder is not None and holder != n:
                self._problem(n, f"duplicate partition-id {cid} (already held by node {holder}); node not used")
                self.claims[n] = cid
                continue
            self.cid_to_node[cid] = n
            self.node_to_cid[n] = cid
            self.node_problems.pop(n, None)
            self.claims.pop(n, None)
            log(INFO, "fedsafe: node %d holds client %d%s", n, cid,
                " (malicious)" if cid in self.engine.malicious else "")
        for n in nodes:
            if n not in answered:  # asked again at the next round
                log(WARNING, "fedsafe: node %d did not answer the partition-id query in %.0f s", n,
                    self.query_timeout_s)

    # ------------------------------------------------------------------ train round
    def _rnd(self, server_round: int) -> int:
        return self.round_offset + server_round - 1

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the global adapter to the nodes of exactly the clients the in-process engine samples."""
        eng, fl = self.engine, self.engine.cfg.fl
        rnd = self._rnd(server_round)
        t0 = time.time()
        lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
        sampled = sample_clients(eng.cfg.seed, rnd, eng.K, fl.sample_clients, eng.malicious, fl.sampling,
                                 fl.malicious_per_round)
        want = range(eng.K) if not self._waited else ()
        missing = self.map_nodes(grid, want, self.node_wait_s if not self._waited else 0.0)
        if missing and not self._waited:
            log(WARNING, "fedsafe: no SuperNode holds client(s) %s after %.0f s; they count as rejected when "
                "sampled", missing, self.node_wait_s)
        self._waited = True
        global_rec = ArrayRecord(eng.rt.handle.state_dict(eng.global_vec))
        msgs, sent, unavailable = [], {}, {}
        for cid in sampled:
            node = self.cid_to_node.get(cid)
            if node is None:
                unavailable[cid] = f"no SuperNode holds partition-id {cid}"
                continue
            rec = RecordDict({
                "arrays": global_rec,
                "config": ConfigRecord({"server-round": server_round, "round": rnd, "lr": lr, "client-id": cid}),
            })
            if eng.scaffold is not None:
                rec["scaffold"] = ArrayRecord({"correction": eng.scaffold.correction(cid)})
            msgs.append(Message(rec, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
            sent[node] = cid
        log(INFO, "fedsafe: round %d/%d, lr %.3g, clients %s -> nodes %s", rnd + 1, fl.rounds, lr, sampled,
            [self.cid_to_node.get(c) for c in sampled])
        self._pending = {"rnd": rnd, "sampled": sampled, "sent": sent, "unavailable": unavailable, "t0": t0}
        return msgs

    def check_reply(self, msg: Message) -> tuple[dict, dict]:
        """A reply's adapter state dict (validated) and metrics; raises ``RejectedUpdate`` with the reason."""
        eng = self.engine
        if msg.has_error():
            raise RejectedUpdate(f"error reply (code {msg.error.code}): {msg.error.reason}")
        if not msg.has_content():
            raise RejectedUpdate("reply has no content")
        recs = msg.content.array_records
        if "arrays" not in recs:
            raise RejectedUpdate(f"reply has no ArrayRecord 'arrays' (records: {sorted(msg.content.keys())})")
        check_reply_size(msg.content, eng.keys, eng.shapes)  # nothing is decoded into tensors before this
        try:
            sd = record_to_state_dict(recs["arrays"])
        except ValueError as e:
            raise RejectedUpdate(str(e)) from None
        mrec = msg.content.metric_records.get("metrics")
        loss = None if mrec is None else mrec.get("train_loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise RejectedUpdate("reply has no numeric train_loss in MetricRecord 'metrics'")
        validate_state(sd, eng.keys, eng.shapes, eng.global_vec, eng.cfg.fl.max_update_norm)
        metrics = {"loss": float(loss)}
        for k in ("tokens", "seconds", "num-examples"):
            if k in mrec:
                metrics[k] = mrec[k]
        return sd, metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies (drop and report bad ones by node id), then run the engine's round."""
        p = self._pending
        rnd = self._rnd(server_round)
        if p is None or p["rnd"] != rnd:
            raise RuntimeError(f"aggregate_train for round {server_round} without configure_train")
        self._pending = None
        updates: dict[int, tuple[dict, dict]] = {}
        problems: dict[int, str] = dict(p["unavailable"])
        seen: set[int] = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            cid = p["sent"].get(node)
            if cid is None:
                log(WARNING, "fedsafe: round %d: reply from node %d, which was sent no task; ignored", rnd + 1, node)
                continue
            if cid in seen:
                log(WARNING, "fedsafe: round %d: second reply from node %d ignored", rnd + 1, node)
                continue
            seen.add(cid)
            try:
                updates[cid] = self.check_reply(msg)
            except RejectedUpdate as e:
                problems[cid] = f"node {node}: {e}"
                log(WARNING, "fedsafe: round %d: dropped the update of client %d from node %d: %s", rnd + 1, cid,
                    node, e)
        for node, cid in p["sent"].items():
            if cid not in seen:
                problems[cid] = f"node {node}: no reply within the round timeout"
                log(WARNING, "fedsafe: round %d: no reply from node %d (client %d)", rnd + 1, node, cid)
        row = self._run_engine_round(rnd, updates, problems, p)
        loss = row.get("train_loss")
        log(INFO, "fedsafe: round %d/%d done: %d updates aggregated, %d rejected, train loss %s", rnd + 1,
            self.engine.cfg.fl.rounds, len(updates), len(problems), "n/a" if loss is None else f"{loss:.4f}")
        metrics = {"num-updates": len(updates), "num-rejected": len(problems)}
        if loss is not None and math.isfinite(loss):
            metrics["train_loss"] = float(loss)
        return ArrayRecord(self.engine.rt.handle.state_dict(self.engine.global_vec)), MetricRecord(metrics)

    def _run_engine_round(self, rnd: int, updates: dict, problems: dict, pending: dict) -> dict:
        """``Engine.run_round`` with the received updates standing in for local training."""
        eng = self.engine
        monitor = eng.round_callback

        def client_update(cid: int, rnd_: int, lr: float):
            u = updates.get(cid)
            return (u[0], u[1]) if u is not None else (None, {"loss": float("nan")})

        def callback(rnd_: int, vec: torch.Tensor) -> dict:
            extra = dict(monitor(rnd_, vec) or {}) if monitor is not None else {}
            if problems:  # the engine only saw "not a state dict" for these; keep the real reasons
                extra["rejected"] = {str(c): problems[c] for c in sorted(problems)}
            extra["nodes"] = {str(c): n for n, c in sorted(pending["sent"].items(), key=lambda x: x[1])}
            extra["round_seconds"] = round(time.time() - pending["t0"], 3)
            self.rounds.append({"round": rnd, "nodes": {str(c): n for n, c in pending["sent"].items()},
                                "rejected": {str(c): r for c, r in sorted(problems.items())}})
            if self.on_round is not None:
                self.on_round()
            return extra

        eng.client_update = client_update  # instance attribute shadows the method for this round only
        eng.round_callback = callback
        try:
            return eng.run_round(rnd)
        finally:
            del eng.client_update
            eng.round_callback = monitor

    # ------------------------------------------------------------------ no federated evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
