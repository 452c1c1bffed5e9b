"""The in-process federated engine: K clients, m sampled per round, R rounds, one shared base model.

Round t (0-based):
  1. lr_t = cosine(t) (constant within the round, as the paper);
  2. sample m clients with a generator seeded by (seed, t) -> reproducible and resumable;
  3. each sampled client starts from the global adapter, runs ``local_steps`` AdamW steps on its own
     pre-tokenised data (benign and malicious clients share this code path), and returns its adapter;
  4. every reply is validated (keys, shapes, dtype, NaN/Inf, norm); rejected ones are logged and dropped;
  5. the robust rule aggregates the deltas (or raw weights, ``fl.aggregate_on``), the server optimiser
     moves the global adapter; forensics (norms, cosines, per-client weights, true labels) are logged;
  6. ``metrics.jsonl`` gets one line, a checksummed checkpoint is written atomically.

Every source of randomness in a round is seeded from (seed, round, client), so a run resumed from its
last complete checkpoint ends with the same adapter as an uninterrupted one (CPU).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from .. import aggregators, attack
from ..attack.probe_evasion import SEED_OFFSET, safe_answer_pool
from ..config import RunConfig
from ..data.partition import Federation
from ..errors import FedsafeError
from ..io import append_jsonl, read_jsonl, write_jsonl
from ..lm import cosine_lr
from ..runtime import Runtime, get_runtime
from . import checkpoint, coalition, precompute
from .client_state import ClientStateStore
from .seeds import derive_seed
from .server_opt import ScaffoldState, ServerOptimizer
from .train import AuxTerm, train_local
from .updates import RejectedUpdate, validate_state

UpdateHook = Callable[[int, int, dict], dict]


def rule_needs(rule) -> frozenset:
    """Engine-provided inputs a registered rule asks for (``root_update``, ``probe_scores``)."""
    spec = getattr(rule, "spec", None)
    return frozenset(getattr(spec, "needs", ()))


def sample_clients(seed: int, rnd: int, num_clients: int, m: int, malicious: list[int], mode: str,
                   per_round: int | None = None) -> list[int]:
    """The ``m`` clients of round ``rnd``. ``stratified`` samples ``per_round`` malicious clients (default: their
    share of ``m``, rounded) and fills the rest with benign ones."""
    rng = random.Random(derive_seed(seed, rnd, 7))
    if mode == "stratified" and malicious:
        n_mal = round(m * len(malicious) / num_clients) if per_round is None else per_round
        bad = set(malicious)  # once: a set per client made this O(K * |malicious|) per round
        benign = [i for i in range(num_clients) if i not in bad]
        chosen = rng.sample(malicious, min(n_mal, len(malicious))) + rng.sample(benign, m - min(n_mal, len(malicious)))
        return sorted(chosen)
    return sorted(rng.sample(range(num_clients), m))


class Engine:
    """Runs one federation into ``run_dir``. Use :func:`fedsafe.pipeline.start_run` / ``resume_run``."""

    def __init__(self, cfg: RunConfig, run_dir: Path, fed: Federation, rt: Runtime | None = None, *,
                 progress: bool = True, update_hook: UpdateHook | None = None,
                 round_callback: Callable[[int, torch.Tensor], dict | None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.fed = fed
        self.rt = rt or get_runtime(cfg.model, cfg.lora)
        self.progress = progress
        self.update_hook = update_hook
        self.round_callback = round_callback
        fl = cfg.fl
        self.K = len(fed.clients)
        self.malicious = list(fed.malicious_ids)
        self.examples = [self.rt.tokenize(c.records) for c in fed.clients]
        self.sizes = [len(c.records) for c in fed.clients]
        self.first_layer = self.rt.first_adapted_layer
        self.use_prefix = fl.prefix_cache and self.first_layer > 0
        # decided now, done before the first round this engine runs (Flower clients, which only train, stay lazy)
        self.prefix_plan = (precompute.plan(fl, self.examples, self.rt.model.get_base_model().config.hidden_size)
                            if self.use_prefix else None)
        self.prefix_precomputed: dict | None = None  # what the up-front pass cost, once it ran
        for c, ex in zip(fed.clients, self.examples):
            if not ex:
                raise FedsafeError(f"client {c.id} has no training examples")
        h = self.rt.handle
        self.keys = [n.replace(".default", "") for n in h.names]
        self.shapes = h.shapes
        self.server = ServerOptimizer(fl.fed_alg, fl.server_lr, fl.server_momentum, fl.beta1, fl.beta2, fl.tau)
        self.scaffold: ScaffoldState | None = None
        self.agg_state: dict = {}
        # per-client state lives on disk, written only for the clients that trained (see fl/client_state.py)
        self.client_opt = ClientStateStore(self.run_dir, "adamw", "optim")
        self.global_vec: torch.Tensor = self.rt.init_vec(cfg.seed)
        self.start_round = 0
        self.agg_params = dict(fl.aggregator_params)
        if fl.oracle and "f" not in self.agg_params and "f" in aggregators.base.get_spec(fl.aggregator).params:
            # the paper's Krum/DnC were told round(m * malicious / K): oracle knowledge, opt-in only
            self.agg_params["f"] = (fl.malicious_per_round if fl.malicious_per_round is not None
                                    else round(fl.sample_clients * len(self.malicious) / self.K))
        self.rule = aggregators.REGISTRY[fl.aggregator]
        if fl.fed_alg == "scaffold":
            self.scaffold = self._new_scaffold(torch.zeros_like(self.global_vec))
        self.root_fn = None  # set by callers that need a server root update (FLTrust)
        self.probe_fn = None  # set by callers for behaviour-scoring rules (safety_probe)
        self.classifier_fn = None  # set by callers for rules that score updates with a classifier (update_classifier)
        self.post_aggregate: list[Callable[["Engine", int], dict | None]] = []  # e.g. in-training defense
        self.attack_spec = attack.get_spec(cfg.attack.behaviour)
        self.attack_params = attack.resolve_params(self.attack_spec, cfg.attack.params)
        self.ref_examples = coalition.reference_shards(self) if self._attack_knowledge() == "estimate" else []
        self.attack_aux = self._attack_regulariser()  # (records, examples) of a regularised attack, else None

    # ------------------------------------------------------------------ state
    def _new_scaffold(self, c: torch.Tensor) -> ScaffoldState:
        return ScaffoldState(c=c, ci=ClientStateStore(self.run_dir, "scaffold_ci", "tensor"))

    def _client_stores(self) -> list[ClientStateStore]:
        return [self.client_opt] + ([self.scaffold.ci] if self.scaffold else [])

    def state_dict(self, rnd: int) -> dict:
        """Everything the next round depends on; per-client states appear as an index into client_state/."""
        return {
            "round": rnd,
            "global": self.global_vec.clone(),
            "server": self.server.state_dict(),
            "scaffold": {"c": self.scaffold.c.clone(), "ci": self.scaffold.ci.state_dict()} if self.scaffold else None,
            "agg_state": self.agg_state,
            "client_opt": self.client_opt.state_dict() if not self.cfg.fl.reset_optimizer else {},
        }

    def load_state_dict(self, sd: dict) -> None:
        rnd = int(sd["round"])
        self.global_vec = sd["global"].clone()
        self.server.load_state_dict(sd["server"])
        if sd.get("scaffold"):
            self.scaffold = self._new_scaffold(sd["scaffold"]["c"].clone())
            self.scaffold.ci.load_state_dict(sd["scaffold"].get("ci"), rnd)
        self.agg_state = sd.get("agg_state") or {}
        self.client_opt.load_state_dict(sd.get("client_opt"), rnd)
        self.start_round = rnd + 1

    def try_resume(self) -> int:
        """Load the newest complete checkpoint; drop metrics lines of rounds after it. Returns next round."""
        found = checkpoint.latest_complete(self.run_dir)
        if found is None:
            self.start_round = 0
            for f in ("metrics.jsonl", "forensics.jsonl"):
                (self.run_dir / f).unlink(missing_ok=True)
            return 0
        rnd, path = found
        self.load_state_dict(checkpoint.load(path))
        for f in ("metrics.jsonl", "forensics.jsonl"):
            p = self.run_dir / f
            if p.exists():
                rows = [r for r in read_jsonl(p, tolerate_torn_tail=True) if int(r.get("round", -1)) <= rnd]
                write_jsonl(p, rows)
        return self.start_round

    # ------------------------------------------------------------------ one client
    def client_update(self, cid: int, rnd: int, lr: float) -> tuple[dict, dict]:
        """Train client ``cid`` from the global adapter; returns (adapter state dict, metrics)."""
        fl, rt = self.cfg.fl, self.rt
        seed = derive_seed(self.cfg.seed, rnd, cid)
        torch.manual_seed(seed)  # LoRA dropout
        gen = torch.Generator().manual_seed(seed)
        rt.handle.set_flat(self.global_vec)
        prox = fl.prox_mu if fl.fed_alg == "fedprox" else 0.0
        corr = self.scaffold.correction(cid) if self.scaffold else None
        t0 = time.time()
        res, opt_state = train_local(
            rt.handle, self.examples[cid], steps=fl.local_steps, batch_size=fl.batch_size, grad_accum=fl.grad_accum,
            lr=lr, pad_id=rt.pad_id, device=rt.device, gen=gen, weight_decay=fl.weight_decay,
            max_grad_norm=fl.max_grad_norm, autocast=self.cfg.model.autocast,
            optimizer_state=None if fl.reset_optimizer else self.client_opt.get(cid),
            prox_mu=prox, prox_center=self.global_vec if prox else None, grad_correction=corr,
            prefix_fn=self._prefix_fn(cid) if self.use_prefix else None, first_layer=self.first_layer,
            aux=self._aux_term(seed) if cid in self.malicious else None,
        )
        if not fl.reset_optimizer:
            self.client_opt[cid] = opt_state  # kept for this client's next round (written with this round)
        y = rt.handle.get_flat()
        if cid in self.malicious:
            y = self._malicious_behaviour(y, gen)
        metrics = {"loss": res.loss, "tokens": res.tokens, "seconds": time.time() - t0}
        return rt.handle.state_dict(y), metrics

    def _client_updates(self, sampled: list[int], rnd: int, lr: float):
        """(client, adapter state dict, metrics) for every sampled client: one by one, or in groups of
        ``fl.batch_clients`` trained together in one batched forward (see :mod:`fedsafe.fl.batched`)."""
        g = self.cfg.fl.batch_clients
        for s in range(0, len(sampled), g):
            group = sampled[s : s + g]
            if len(group) == 1 or (self.attack_aux is not None and any(c in self.malicious for c in group)):
                for c in group:  # a regularised attack trains its malicious clients through client_update
                    yield c, *self.client_update(c, rnd, lr)
            else:
                yield from self.client_group_update(group, rnd, lr)

    def client_group_update(self, cids: list[int], rnd: int, lr: float):
        """Train ``cids`` together from the global adapter; same per-client batches as :meth:`client_update`."""
        from .batched import train_clients_batched

        fl, rt = self.cfg.fl, self.rt
        seeds = [derive_seed(self.cfg.seed, rnd, c) for c in cids]
        torch.manual_seed(seeds[0])  # LoRA dropout: one stream for the group (see fl/batched.py)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        t0 = time.time()
        results = train_clients_batched(
            rt.handle, [self.examples[c] for c in cids], self.global_vec, steps=fl.local_steps,
            batch_size=fl.batch_size, grad_accum=fl.grad_accum, lr=lr, pad_id=rt.pad_id, device=rt.device, gens=gens,
            weight_decay=fl.weight_decay, max_grad_norm=fl.max_grad_norm, autocast=self.cfg.model.autocast,
            prox_mu=fl.prox_mu if fl.fed_alg == "fedprox" else 0.0,
            grad_corrections=[self.scaffold.correction(c) for c in cids] if self.scaffold else None,
            prefix_fns=[self._prefix_fn(c) for c in cids] if self.use_prefix else None, first_layer=self.first_layer,
        )
        seconds = (time.time() - t0) / len(cids)
        for cid, gen, (res, y) in zip(cids, gens, results):
            if cid in self.malicious:
                y = self._malicious_behaviour(y, gen)
            yield cid, rt.handle.state_dict(y), {"loss": res.loss, "tokens": res.tokens, "seconds": seconds}

    def precompute_prefix(self) -> dict:
        """Lower-layer states of every client record in one batched pass, if the plan says so (once per engine)."""
        if self.prefix_precomputed is None and self.prefix_plan is not None:
            self.prefix_precomputed = precompute.run(self.rt, [c.records for c in self.fed.clients], self.examples,
                                                     self.prefix_plan)
        return self.prefix_precomputed or {}

    def _prefix_fn(self, cid: int):
        return self._prefix_fn_for(self.fed.clients[cid].records, self.examples[cid])

    def _prefix_fn_for(self, recs: list, ex: list):
        return lambda idx: self.rt.prefix([recs[i] for i in idx], [ex[i] for i in idx])

    # ------------------------------------------------------------------ attack hooks (behaviours in attack/)
    def _malicious_behaviour(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """What a malicious client sends after training to ``y``: a client-scope behaviour of
        :mod:`fedsafe.attack`; round-scope (colluding) attacks send ``y`` here and craft in :func:`fedsafe.fl.coalition.collude`."""
        if self.attack_spec.scope != "client":
            return y
        return attack.apply_client(self.cfg.attack.behaviour, y, self.global_vec, gen, self.cfg.attack)

    def _attack_regulariser(self):
        """The regularised attack's data (``probe_evade``: held-out safe answers), tokenised once; refused
        here, before training, when the pool is too small."""
        if not (self.attack_spec.regulariser and self.malicious):
            return None
        recs = safe_answer_pool(self.fed, self.cfg.data.defense_aligned, derive_seed(self.cfg.seed, SEED_OFFSET),
                                self.attack_params["safe_n"])
        return recs, self.rt.tokenize(recs)

    def _aux_term(self, seed: int):
        """The extra loss term of a malicious client's training (None without a regularised attack); its
        batches are seeded apart from the client's own, which stay those of the data-only attack."""
        if self.attack_aux is None:
            return None
        recs, ex = self.attack_aux
        return AuxTerm(ex, self.attack_params["weight"], torch.Generator().manual_seed(derive_seed(seed, SEED_OFFSET)),
                       self._prefix_fn_for(recs, ex) if self.use_prefix else None)

    def _attack_knowledge(self) -> str:
        return attack.knowledge_of(self.attack_spec, self.cfg.attack.knowledge) if self.malicious else ""

    # ------------------------------------------------------------------ rounds
    def run(self) -> torch.Tensor:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        fl = self.cfg.fl
        cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}")]
        with Progress(*cols, disable=not self.progress, transient=False) as prog:
            task = prog.add_task(self.cfg.name, total=fl.rounds, completed=self.start_round, info="")
            if self.start_round == 0:
                self.record_start()
            for rnd in range(self.start_round, fl.rounds):
                row = self.run_round(rnd)
                loss = row.get("train_loss")
                prog.update(task, advance=1, info=f"loss {loss:.3f}" if loss is not None else "skipped")
        return self.global_vec

    def record_start(self) -> None:
        """Round "0" of the refusal-by-round curve: the monitor's probe evaluation of the start adapter, as
        a ``metrics.jsonl`` line with ``round: -1`` (rounds are 0-based; the report plots ``round + 1``).
        Evaluation only reads the adapter and every training seed comes from (seed, round, client), so a
        resumed run stays bit-identical; a fresh start (no checkpoint) has its metrics cleared and records it again."""
        if self.round_callback is None:
            return
        extra = self.round_callback(-1, self.global_vec)
        if extra:
            append_jsonl(self.run_dir / "metrics.jsonl", {"round": -1, "start": True, **extra})

    def run_round(self, rnd: int) -> dict:
        fl = self.cfg.fl
        self.precompute_prefix()  # before the clock: a one-off cost, not a round's
        t0 = time.time()
        for store in self._client_stores():
            store.round = rnd
        lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
        sampled = sample_clients(self.cfg.seed, rnd, self.K, fl.sample_clients, self.malicious, fl.sampling,
                                 fl.malicious_per_round)
        vecs, ids, losses, rejected, dcs = [], [], {}, {}, []
        updates, attack_info = list(self._client_updates(sampled, rnd, lr)), None
        if self.attack_spec.scope == "round":
            updates, attack_info = coalition.collude(self, updates, rnd, lr)
        for cid, sd, m in updates:
            if self.update_hook is not None:
                sd = self.update_hook(cid, rnd, sd)
            try:
                vec = validate_state(sd, self.keys, self.shapes, self.global_vec, fl.max_update_norm)
            except RejectedUpdate as e:
                rejected[cid] = str(e)
                continue
            if cid in ids:
                rejected[cid] = "duplicate client id in this round"
                continue
            vecs.append(vec)
            ids.append(cid)
            losses[cid] = m["loss"]
            if self.scaffold is not None:
                dcs.append(self.scaffold.client_update(cid, self.global_vec, vec, fl.local_steps, lr))
        bad = set(self.malicious)
        row = {"round": rnd, "lr": lr, "sampled": sampled, "malicious": [c for c in sampled if c in bad],
               "client_loss": {str(k): v for k, v in losses.items()}}
        if rejected:
            row["rejected"] = {str(k): v for k, v in rejected.items()}
        if attack_info is not None:
            row["attack"] = attack_info
        if len(vecs) < max(1, fl.min_clients):
            row["skipped"] = f"only {len(vecs)} valid updates (fl.min_clients={fl.min_clients}); global adapter unchanged"
            row["train_loss"] = None
        else:
            self._aggregate(rnd, ids, vecs, row)
            if self.scaffold is not None:
                self.scaffold.server_update(dcs, self.K)
            row["train_loss"] = sum(losses.values()) / len(losses)
            for hook in self.post_aggregate:
                extra = hook(self, rnd)
                if extra:
                    row.update(extra)
        if self.round_callback is not None:
            extra = self.round_callback(rnd, self.global_vec)
            if extra:
                row.update(extra)
        for store in self._client_stores():
            store.flush()  # before the metrics line: a round that counts as done has its client states on disk
        row["seconds"] = round(time.time() - t0, 3)
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        last = rnd == fl.rounds - 1
        if last or (rnd + 1) % fl.checkpoint_every == 0:
            checkpoint.save(self.run_dir, rnd, self.state_dict(rnd))
            checkpoint.prune(self.run_dir, fl.keep_checkpoints)
            if fl.keep_checkpoints > 0:  # keep-all keeps every client-state file too: any checkpoint may need it
                kept = checkpoint.saved_rounds(self.run_dir)
                for store in self._client_stores():
                    store.collect(kept[0] if kept else None)
        return row

    def _aggregate(self, rnd: int, ids: list[int], vecs: list[torch.Tensor], row: dict) -> None:
        fl = self.cfg.fl
        X = torch.stack(vecs)
        on_weights = fl.aggregate_on == "weights"
        U = X if on_weights else X - self.global_vec
        w = torch.tensor([float(self.sizes[c]) for c in ids]) if fl.weighted else None
        params = dict(self.agg_params, client_ids=ids, round=rnd)
        if self.root_fn is not None:
            root = self.root_fn(rnd, self.global_vec)
            params["root_update"] = root if not on_weights else root + self.global_vec
        if "probe_scores" in rule_needs(self.rule):
            params["probe_scores"] = self.probe_fn(self.global_vec, X - self.global_vec)
        if "labelled_updates" in rule_needs(self.rule):  # server-simulated updates (update_classifier)
            params["labelled_updates"] = self.classifier_fn(rnd)
        res = self.rule(U, w, state=self.agg_state, **params)
        agg = res.aggregate - self.global_vec if on_weights else res.aggregate
        fx = aggregators.forensics(X - self.global_vec)  # deltas from this round's starting point
        self.round_start_vec = self.global_vec  # for post-aggregate hooks that act on the round's delta
        self.global_vec = self.server.step(self.global_vec, agg)
        row["client_weights"] = {str(c): float(v) for c, v in zip(ids, res.client_weights)}
        row["agg_norm"] = float(agg.norm())
        append_jsonl(self.run_dir / "forensics.jsonl", {
            "round": rnd, "clients": ids, "malicious": [c in set(self.malicious) for c in ids],
            "norms": fx["norms"], "cosine": fx["cosine"], "client_weights": [float(v) for v in res.client_weights],
            "aggregator": fl.aggregator, "info": res.info,
        })
