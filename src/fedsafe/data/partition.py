"""Build the federation: which client holds which records, and what the server holds out.

Order of steps (each one only ever *removes* candidates from later steps):

1. load each source spec once; de-duplicate by record id; shuffle with the data seed;
2. reserve the evaluation sets first (harmful prompts, benign prompts with reference answers), then
   the server's probe sets from what is left, skipping probes that duplicate an eval prompt;
3. remove every training/defense candidate that duplicates an eval or probe prompt
   (:mod:`.contamination`), unless ``allow_contamination``;
4. assign clients, benign groups first and malicious last, according to ``split``;
5. whatever is left of each source is ``heldout[spec]``: the Level-1 defense pool. Because shards are
   taken from the front of each shuffled pool, the held-out part is its tail, as in the paper's code.

A final check re-runs the contamination test on every client and held-out set and raises if anything
slipped through. Every record is assigned at most once, except when a source has fewer unique records
than its clients need and ``upsample`` is on: then each client still gets a *disjoint* share of the
unique records, topped up by sampling with replacement from its own share, and the federation records
it in ``upsampled`` and ``notes``.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import DataError
from .config import ClientGroup, DataConfig, group_name, ordered_groups
from .contamination import ContaminationIndex, assert_no_contamination
from .files import FileReport, file_report
from .records import Record
from .sources import load_source, spec_options

HARMFUL_KINDS = ("prompt", "unaligned", "aligned")


@dataclass
class ClientData:
    id: int
    records: list[Record]
    malicious: bool
    group: str


@dataclass
class Federation:
    clients: list[ClientData]
    eval_harmful: list[Record]
    eval_benign: list[Record]  # with reference responses (false refusal, log-likelihood)
    probe_harmful: list[Record]
    probe_benign: list[Record]
    heldout: dict[str, list[Record]]
    malicious_ids: list[int]
    seed: int = 0
    split: str = "iid"
    upsampled: dict[str, dict[str, int]] = field(default_factory=dict)
    contamination_removed: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec -> FileReport.to_dict() of a local file

    def eval_prompts(self) -> list[Record]:
        """Everything the clients and the defense must not train on."""
        return self.eval_harmful + self.eval_benign + self.probe_harmful + self.probe_benign

    def summary(self) -> dict[str, Any]:
        """Counts by kind and source per client and per held-out set, with character-length stats."""
        return {
            "seed": self.seed,
            "split": self.split,
            "malicious_ids": list(self.malicious_ids),
            "clients": [
                {"id": c.id, "group": c.group, "malicious": c.malicious, **describe_records(c.records)} for c in self.clients
            ],
            "eval_harmful": describe_records(self.eval_harmful),
            "eval_benign": describe_records(self.eval_benign),
            "probe_harmful": describe_records(self.probe_harmful),
            "probe_benign": describe_records(self.probe_benign),
            "heldout": {spec: describe_records(recs) for spec, recs in self.heldout.items()},
            "upsampled": dict(self.upsampled),
            "contamination_removed": dict(self.contamination_removed),
            "notes": list(self.notes),
            "files": {spec: dict(rep) for spec, rep in self.files.items()},
        }

    def to_manifest(self) -> dict[str, Any]:
        """Record ids of every set, for the run directory (upsampled duplicates appear repeatedly)."""
        return {
            "seed": self.seed,
            "split": self.split,
            "malicious_ids": list(self.malicious_ids),
            "clients": [
                {"id": c.id, "group": c.group, "malicious": c.malicious, "records": [r.id for r in c.records]}
                for c in self.clients
            ],
            "eval_harmful": [r.id for r in self.eval_harmful],
            "eval_benign": [r.id for r in self.eval_benign],
            "probe_harmful": [r.id for r in self.probe_harmful],
            "probe_benign": [r.id for r in self.probe_benign],
            "heldout": {spec: [r.id for r in recs] for spec, recs in self.heldout.items()},
            "upsampled": dict(self.upsampled),
            "contamination_removed": dict(self.contamination_removed),
        }


def describe_records(records: Sequence[Record]) -> dict[str, Any]:
    return {
        "n": len(records),
        "unique": len({r.id for r in records}),
        "by_kind": dict(sorted(Counter(r.kind for r in records).items())),
        "by_source": dict(sorted(Counter(r.source for r in records).items())),
        "instruction_chars": _length_stats([len(r.instruction) for r in records]),
        "response_chars": _length_stats([len(r.response) for r in records]),
    }


def _length_stats(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": min(xs), "median": statistics.median(xs), "mean": round(statistics.fmean(xs), 1), "max": max(xs)}


# ---------------------------------------------------------------- randomness and apportioning


def _rng(seed: int, *tags: Any) -> np.random.Generator:
    """Independent stream per purpose; sha256 keeps it stable across processes (str hash is salted)."""
    words = [int.from_bytes(hashlib.sha256(str(t).encode()).digest()[:4], "big") for t in tags]
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder; ties to the first)."""
    w = np.asarray(weights, dtype=float)
    if total <= 0 or w.sum() <= 0:
        return [0] * len(w)
    exact = w / w.sum() * total
    base = np.floor(exact).astype(int)
    rest = total - int(base.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base.tolist()


def _iid_counts(sizes: list[int], fracs: list[float]) -> np.ndarray:
    return np.array([apportion(n, fracs) for n in sizes], dtype=int).reshape(len(sizes), len(fracs))


def _by_source_counts(sizes: list[int], fracs: list[float]) -> np.ndarray:
    """Each client holds a single source; the number of clients per source follows the fractions."""
    per_source = apportion(len(sizes), fracs)
    M = np.zeros((len(sizes), len(fracs)), dtype=int)
    c = 0
    for s, k in enumerate(per_source):
        for _ in range(k):
            M[c, s] = sizes[c]
            c += 1
    return M


def _dirichlet_counts(sizes: list[int], fracs: list[float], alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Label-skew split: client sizes and each source's group total are kept; *who* gets how much of
    each source follows Dirichlet(alpha) proportions (small alpha = more skew).

    Per source, proportions over clients are drawn from Dir(alpha). Iterative proportional fitting
    then rescales the matrix to the required row sums (client sizes) and column sums (source totals)
    while keeping its skew pattern, and a two-way rounding makes it integral.
    """
    C, S = len(sizes), len(fracs)
    col = np.array(apportion(sum(sizes), fracs), dtype=float)
    row = np.array(sizes, dtype=float)
    if C == 1 or S == 1:
        return _iid_counts(sizes, fracs)
    P = rng.dirichlet([alpha] * C, size=S).T  # C x S, each column a distribution over clients
    active = col > 0  # a source rounded to zero samples stays out of IPF (0/0 otherwise)
    if active.sum() <= 1:
        return _iid_counts(sizes, fracs)
    M = np.zeros((C, S))
    M[:, active] = P[:, active] * col[None, active] + 1e-9  # strictly positive: IPF can reach any margins
    for _ in range(1000):
        M *= (row / M.sum(axis=1))[:, None]
        M[:, active] *= (col[active] / M[:, active].sum(axis=0))[None, :]
        if np.abs(M.sum(axis=1) - row).max() < 1e-6:
            break
    F = np.floor(M + 1e-9).astype(int)
    rdef = row.astype(int) - F.sum(axis=1)
    cdef = col.astype(int) - F.sum(axis=0)
    # hand out the remaining units to the cells with the largest fractional parts, respecting both margins
    order = sorted(((-(M[i, s] - F[i, s]), i, s) for i in range(C) for s in range(S)))
    while rdef.sum() > 0:
        for _, i, s in order:
            if rdef[i] > 0 and cdef[s] > 0:
                F[i, s] += 1
                rdef[i] -= 1
                cdef[s] -= 1
    assert (F.sum(axis=1) == row).all() and (F.sum(axis=0) == col).all()
    return F


def _group_counts(cfg: DataConfig, g: ClientGroup, specs: list[str], rng: np.random.Generator) -> np.ndarray:
    sizes = [g.samples_per_client or cfg.samples_per_client] * g.clients
    fracs = [g.mix[s] for s in specs]
    if cfg.split == "iid":
        return _iid_counts(sizes, fracs)
    if cfg.split == "by_source":
        return _by_source_counts(sizes, fracs)
    return _dirichlet_counts(sizes, fracs, cfg.dirichlet_alpha, rng)


# ---------------------------------------------------------------- the build


def build_federation(
    cfg: DataConfig,
    seed: int | None = None,
    *,
    pools: Mapping[str, Sequence[Record]] | None = None,
    loader: Callable[..., list[Record]] = load_source,
) -> Federation:
    """Partition the configured sources into clients, eval/probe sets and held-out pools.

    ``seed`` overrides ``cfg.shuffle_seed``. ``pools`` supplies records for some specs directly
    (generated data, tests); other specs are loaded with ``loader``.
    """
    cfg.validate(extra_specs=tuple(pools or ()))
    seed = cfg.shuffle_seed if seed is None else int(seed)
    notes: list[str] = []
    reports: dict[str, FileReport] = {}
    pool = _load_pools(cfg, pools or {}, loader, seed, reports)

    # 2. evaluation and probe sets, before anything else sees the pools
    eval_harmful = _take(pool, cfg.eval_harmful, cfg.eval_harmful_n, "eval_harmful", None)
    eval_benign = _take(pool, cfg.eval_benign, cfg.eval_benign_n, "eval_benign", None)
    eval_index = ContaminationIndex(eval_harmful + eval_benign)
    probe_harmful = _take(pool, cfg.eval_harmful, cfg.probe_n, "probe_harmful", eval_index)
    probe_benign = _take(pool, cfg.eval_benign, cfg.probe_n, "probe_benign", eval_index)
    eval_harmful = [r.as_prompt() for r in eval_harmful]
    probe_harmful = [r.as_prompt() for r in probe_harmful]
    held_back = eval_harmful + eval_benign + probe_harmful + probe_benign

    # 3. decontaminate every remaining pool against all of them
    removed: dict[str, int] = {}
    if not cfg.allow_contamination and held_back:
        index = ContaminationIndex(held_back)
        for spec, recs in pool.items():
            clean = [r for r in recs if not index.is_contaminated(r.instruction)]
            if len(clean) < len(recs):
                removed[spec] = len(recs) - len(clean)
                notes.append(f"{spec}: removed {removed[spec]} record(s) duplicating an eval/probe prompt")
            pool[spec] = clean
    elif cfg.allow_contamination:
        notes.append("allow_contamination: eval/probe duplicates were NOT removed from training pools")

    # 4. clients
    groups = ordered_groups(cfg.groups)
    names = {id(g): group_name(cfg.groups, i) for i, g in enumerate(cfg.groups)}
    plan: list[tuple[int, ClientGroup, dict[str, int]]] = []  # (client id, group, spec -> count)
    cid = 0
    for g in groups:
        specs = [s for s, f in g.mix.items() if f > 0]
        M = _group_counts(cfg, g, specs, _rng(seed, "dirichlet", names[id(g)]))
        for ci in range(g.clients):
            plan.append((cid, g, {s: int(M[ci, j]) for j, s in enumerate(specs) if M[ci, j] > 0}))
            cid += 1
        if cfg.split == "by_source":
            got = {s for _, gg, cnt in plan if gg is g for s in cnt}
            for s in specs:
                if s not in got:
                    notes.append(f"group {names[id(g)]}: {s} gets no client ({g.clients} clients, fraction {g.mix[s]:g})")

    given: dict[int, list[Record]] = {c: [] for c, _, _ in plan}
    upsampled: dict[str, dict[str, int]] = {}
    for spec in dict.fromkeys(s for _, _, cnt in plan for s in cnt):
        demand = [(c, cnt[spec]) for c, _, cnt in plan if spec in cnt]
        prompts = sum(r.kind == "prompt" for r in pool[spec])
        if prompts:
            rep = f" [{reports[spec].line()}]" if spec in reports else ""
            raise DataError(f"{spec}: {prompts} record(s) are prompts without a response, but clients train on "
                            f"(instruction, response) pairs; give a file with a response column (or response_col=...){rep}")
        shares, rest = _allocate(spec, pool[spec], demand, cfg.upsample, _rng(seed, "upsample", spec), upsampled, notes,
                                 reports.get(spec))
        for c, recs in shares.items():
            given[c].extend(recs)
        pool[spec] = rest

    clients = []
    for c, g, _ in plan:
        recs = given[c]
        if not recs:
            raise DataError(f"client {c} (group {names[id(g)]}) got no data; check its mix and samples_per_client")
        order = _rng(seed, "client", c).permutation(len(recs))  # interleave sources/kinds within a client
        clients.append(ClientData(c, [recs[i] for i in order], g.malicious, names[id(g)]))

    fed = Federation(
        clients=clients, eval_harmful=eval_harmful, eval_benign=eval_benign, probe_harmful=probe_harmful,
        probe_benign=probe_benign, heldout={s: list(v) for s, v in pool.items()},
        malicious_ids=[c.id for c in clients if c.malicious], seed=seed, split=cfg.split,
        upsampled=upsampled, contamination_removed=removed, notes=notes,
        files={spec: rep.to_dict() for spec, rep in reports.items()},
    )
    for key in ("defense_aligned", "defense_normal"):
        spec = getattr(cfg, key)
        if not fed.heldout.get(spec):
            notes.append(f"{key}: nothing of {spec} is left over for the server's defense pool (all of it went to clients/eval)")
    if not cfg.allow_contamination:
        owners: dict[str, list[Record]] = {f"client {c.id}": c.records for c in clients}
        owners.update({f"heldout:{s}": v for s, v in fed.heldout.items()})
        assert_no_contamination(held_back, owners, what="client or held-out data")
    return fed


def _load_pools(cfg: DataConfig, given: Mapping[str, Sequence[Record]], loader: Callable[..., list[Record]], seed: int,
                reports: dict[str, FileReport]) -> dict[str, list[Record]]:
    """Load every spec once. The length limits and a role's default kind go only to loaders that list them
    (sharegpt and local files take the limits, strongreject does not): they are defaults, not options the
    user wrote, so no loader may refuse them. What a file loader recognised and dropped lands in ``reports``."""
    limits = {"max_instruction_chars": cfg.max_instruction_chars, "max_response_chars": cfg.max_response_chars}
    roles = role_kinds(cfg)
    pool: dict[str, list[Record]] = {}
    for spec in cfg.all_specs():
        if spec in given:
            recs = list(given[spec])
        else:
            accepted = spec_options(spec)
            opts = {k: v for k, v in limits.items() if k in accepted}
            if "default_kind" in accepted and spec in roles:
                opts["default_kind"] = roles[spec]
            recs = loader(spec, **opts)
            rep = file_report(recs)
            if rep is not None:
                reports[spec] = rep
        seen: set[str] = set()
        unique = [r for r in recs if not (r.id in seen or seen.add(r.id))]  # first occurrence wins, order kept
        if spec in reports and len(unique) < len(recs):
            reports[spec].dropped["duplicate"] += len(recs) - len(unique)
            reports[spec].kept = len(unique)
        order = _rng(seed, "pool", spec).permutation(len(unique))
        pool[spec] = [unique[i] for i in order]
    return pool


def role_kinds(cfg: DataConfig) -> dict[str, str]:
    """The kind a role implies for a source that does not say (a local file without ``kind=``): ``unaligned`` in a
    malicious group, ``aligned`` as ``defense_aligned``, ``prompt`` as ``eval_harmful``. A source with two roles
    takes the more specific kind (an explicit pair kind over ``prompt``); conflicting pair kinds imply nothing."""
    roles: dict[str, set[str]] = {}
    for g in cfg.groups:
        if g.malicious:
            for spec in g.mix:
                roles.setdefault(spec, set()).add("unaligned")
    roles.setdefault(cfg.defense_aligned, set()).add("aligned")
    roles.setdefault(cfg.eval_harmful, set()).add("prompt")
    out = {}
    for spec, kinds in roles.items():
        pairs = kinds - {"prompt"}
        if len(pairs) == 1:
            out[spec] = pairs.pop()
        elif not pairs:
            out[spec] = "prompt"
    return out


def _take(pool: dict[str, list[Record]], spec: str, n: int, what: str, avoid: ContaminationIndex | None) -> list[Record]:
    """Reserve ``n`` records of ``spec`` for ``what``, skipping duplicates of records in ``avoid``."""
    if n == 0:
        return []
    taken, keep = [], []
    for r in pool[spec]:
        if len(taken) < n and (avoid is None or not avoid.is_contaminated(r.instruction)):
            taken.append(r)
        else:
            keep.append(r)
    if len(taken) < n:
        knob = f"{what}_n" if what.startswith("eval") else "probe_n"
        raise DataError(f"{what}: {spec} has only {len(taken)} usable record(s) left, {n} asked; lower {knob} or pick a larger source")
    if what in ("eval_harmful", "probe_harmful"):
        bad = [r for r in taken if r.kind not in HARMFUL_KINDS]
        if bad:
            raise DataError(f"{what}: {spec} yields kind {bad[0].kind!r} records; harmful evaluation needs prompts")
    pool[spec] = keep
    return taken


def _allocate(
    spec: str, recs: list[Record], demand: list[tuple[int, int]], upsample: bool, rng: np.random.Generator,
    upsampled: dict[str, dict[str, int]], notes: list[str], report: FileReport | None = None,
) -> tuple[dict[int, list[Record]], list[Record]]:
    """Give each (client, count) consecutive, disjoint records of the shuffled pool; returns the rest."""
    need = sum(n for _, n in demand)
    if need <= len(recs):
        out, pos = {}, 0
        for c, n in demand:
            out[c] = recs[pos : pos + n]
            pos += n
        return out, recs[pos:]
    read = f" [{report.line()}]" if report is not None else ""
    if not upsample:
        raise DataError(
            f"{spec}: clients need {need} records but only {len(recs)} unique ones are left after eval/probe "
            f"reservation and decontamination; set upsample: true, lower samples_per_client, or change the mix{read}"
        )
    if len(recs) < len(demand):
        raise DataError(f"{spec}: has {len(recs)} usable record(s) left after eval/probe reservation and decontamination, "
                        f"but its {len(demand)} clients need at least one each ({need} in all); give more rows or fewer clients{read}")
    # disjoint shares of the unique records, at least one each, then top up from the own share
    shares = [1 + k for k in apportion(len(recs) - len(demand), [n for _, n in demand])]
    shares = [min(s, n) for s, (_, n) in zip(shares, demand)]
    out, pos = {}, 0
    for (c, n), k in zip(demand, shares):
        own = recs[pos : pos + k]
        pos += k
        extra = rng.integers(0, k, size=n - k)
        out[c] = own + [own[i] for i in extra]
    upsampled[spec] = {"unique": pos, "needed": need}
    notes.append(f"{spec}: upsampled {pos} unique record(s) to {need} (with replacement, disjoint between clients)")
    return out, recs[pos:]
