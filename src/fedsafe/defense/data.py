"""Defense data, Levels 1-3 (paper §5, App. C.2).

* Level 1: public data held out from every client and from evaluation (``Federation.heldout``):
  harmful prompts with safe responses (``data.defense_aligned``) and normal pairs (``data.defense_normal``).
* Level 2: an external LLM generates harmful and normal instructions with the paper's prompts, safe
  responses with the paper's suffix and normal responses without one -- or, as the paper released it,
  two pre-generated files (``defense.aligned_data``, ``defense.normal_data``): :func:`from_files`.
* Level 3: the aggregated global model itself generates them (self-alignment).

Generated aligned responses can be filtered with the refusal judge (``filter_refusals``): only those the
judge counts as refusals are kept (the paper's released data kept artefacts such as "I apologize for the
previous response"). Every count is recorded in the provenance.

Any level can carry *safety-recovery examples* (``defense.recovery_share``; Qi et al., "Safety Alignment
Should Be Made More Than Just a Few Tokens Deep", ICLR 2025): :func:`with_recovery`.
"""

from __future__ import annotations

import hashlib
import json
import random

from ..assets import cache_dir
from ..config import RunConfig
from ..data.partition import Federation
from ..data.records import Record
from ..data.safe_responses import safe_response
from ..errors import FedsafeError
from ..eval.judges import get_judge
from ..fl.seeds import derive_seed
from ..io import atomic_write_json, read_jsonl, write_jsonl
from ..llm.synth import (HARMFUL_INSTRUCTION_PROMPT, NORMAL_INSTRUCTION_PROMPT, SAFE_SUFFIX,
                         generate_instructions, generate_responses)


def split_counts(n: int, aligned_ratio: float) -> tuple[int, int]:
    na = int(round(n * aligned_ratio))
    return na, n - na


def reserve(cfg: RunConfig, fed: Federation) -> list[Record]:
    """Pop the alignment records from ``fed.heldout`` (deterministic); no-op unless init.adapter == align."""
    ini = cfg.init
    if ini.adapter != "align":
        return []
    na = int(round(ini.n * ini.aligned_ratio))
    nn = ini.n - na
    out = []
    for spec, k, kind in ((cfg.data.defense_aligned, na, "aligned"), (cfg.data.defense_normal, nn, "normal")):
        pool = fed.heldout.get(spec, [])
        take = [r for r in pool if r.kind == kind][:k]
        if len(take) < k:
            raise FedsafeError(f"init.adapter=align needs {k} held-out {kind} records from {spec}, only "
                               f"{len(take)} are left; lower init.n")
        ids = {r.id for r in take}
        fed.heldout[spec] = [r for r in pool if r.id not in ids]
        out += take
    return out


def level1(fed: Federation, aligned_spec: str, normal_spec: str, n: int, aligned_ratio: float, seed: int) -> tuple[list[Record], dict]:
    na, nn = split_counts(n, aligned_ratio)
    pa = [r for r in fed.heldout.get(aligned_spec, []) if r.kind == "aligned"]
    pn = [r for r in fed.heldout.get(normal_spec, []) if r.kind == "normal"]
    if na > len(pa) or nn > len(pn):
        raise FedsafeError(
            f"defense Level 1 needs {na} aligned ({aligned_spec}) and {nn} normal ({normal_spec}) held-out records, "
            f"but only {len(pa)} and {len(pn)} are left after client and evaluation data; lower defense.n"
        )
    rng = random.Random(seed)
    recs = rng.sample(pa, na) + rng.sample(pn, nn)
    rng.shuffle(recs)
    return recs, {"level": 1, "aligned_source": aligned_spec, "normal_source": normal_spec,
                  "aligned": na, "normal": nn, "pool_aligned": len(pa), "pool_normal": len(pn)}


def from_files(fed, aligned_spec: str, normal_spec: str, n: int, aligned_ratio: float, seed: int, *,
               max_instruction_chars: int | None = None, max_response_chars: int | None = None) -> tuple[list[Record], dict]:
    """Level 2 from pre-generated data: ``n * aligned_ratio`` pairs of ``aligned_spec`` (read as kind ``aligned``
    unless the file says otherwise) and the rest of ``normal_spec``. Rows that duplicate an evaluation or probe
    prompt are removed (and counted): defense data never contains what the model is evaluated on."""
    from ..data.contamination import ContaminationIndex
    from ..data.files import file_report
    from ..data.sources import load_source, spec_options

    na, nn = split_counts(n, aligned_ratio)
    index = ContaminationIndex(fed.eval_prompts())
    prov: dict = {"level": 2, "from_files": True, "aligned_source": aligned_spec, "normal_source": normal_spec}
    pools = {}
    for role, spec, want in (("aligned", aligned_spec, "aligned"), ("normal", normal_spec, None)):
        accepted = spec_options(spec)
        opts = {k: v for k, v in (("max_instruction_chars", max_instruction_chars), ("max_response_chars", max_response_chars),
                                  ("default_kind", want)) if v is not None and k in accepted}
        recs = load_source(spec, **opts)
        rep = file_report(recs)
        kind_ok = [r for r in recs if r.kind == role]
        clean = [r for r in kind_ok if not index.is_contaminated(r.instruction)]
        pools[role] = list({r.id: r for r in clean}.values())  # unique, file order
        prov[f"{role}_file"] = rep.to_dict() if rep is not None else None
        prov[f"{role}_other_kinds"] = len(recs) - len(kind_ok)
        prov[f"{role}_eval_duplicates_removed"] = len(kind_ok) - len(clean)
    if na > len(pools["aligned"]) or nn > len(pools["normal"]):
        raise FedsafeError(
            f"defense Level 2 from files needs {na} aligned ({aligned_spec}) and {nn} normal ({normal_spec}) records, "
            f"but they give {len(pools['aligned'])} and {len(pools['normal'])} usable ones (after dropping other kinds, "
            f"empty or over-long rows and evaluation duplicates); lower defense.n (-n) or give larger files"
        )
    rng = random.Random(seed)
    recs = rng.sample(pools["aligned"], na) + rng.sample(pools["normal"], nn)
    rng.shuffle(recs)
    prov.update(aligned=na, normal=nn, pool_aligned=len(pools["aligned"]), pool_normal=len(pools["normal"]))
    return recs, prov


def heldout_prompts(fed: Federation, spec: str, seed: int) -> list[str]:
    """The held-out harmful prompts of ``spec`` (what clients, the start and evaluation left over), shuffled."""
    pool = sorted((r for r in fed.heldout.get(spec, []) if r.kind == "aligned"), key=lambda r: r.id)
    if not pool:
        raise FedsafeError(f"defense.harmful_prompts=heldout: no held-out harmful prompts of {spec} are left "
                           "after client, start and evaluation data; use defense.harmful_prompts=generate")
    random.Random(seed).shuffle(pool)
    return [r.instruction for r in pool]


def generated(generator, n: int, aligned_ratio: float, *, seed: int, filter_refusals: bool, judge: str = "rule",
              max_new_tokens: int = 128, source: str = "generated", exclude: set[str] | None = None,
              cache_key: dict | None = None, harmful_instructions: list[str] | None = None,
              ) -> tuple[list[Record], dict]:
    """Levels 2/3: instructions and responses from ``generator`` with the paper's prompts.

    ``harmful_instructions``: take the aligned half's instructions from this list (the generator writes only
    the safe answers) instead of generating them. With ``filter_refusals`` an aligned pair is kept only if
    the judge calls its answer a refusal and a normal pair only if it does not."""
    cache = None
    if cache_key is not None:
        given = None if harmful_instructions is None else hashlib.sha256("\n".join(harmful_instructions).encode()).hexdigest()
        key = hashlib.sha256(json.dumps(dict(cache_key, n=n, ratio=aligned_ratio, seed=seed, filter=filter_refusals,
                                             judge=judge, max_new_tokens=max_new_tokens, harmful=given, v=2),
                                        sort_keys=True).encode()).hexdigest()[:24]
        cache = cache_dir() / "defense_data" / f"{key}.jsonl"
        if cache.exists() and cache.with_suffix(".json").exists():
            recs = [Record.from_dict(r) for r in read_jsonl(cache)]
            return recs, json.loads(cache.with_suffix(".json").read_text())
    na, nn = split_counts(n, aligned_ratio)
    prov: dict = {"aligned_requested": na, "normal_requested": nn, "instruction_prompts": {
        "harmful": HARMFUL_INSTRUCTION_PROMPT, "normal": NORMAL_INSTRUCTION_PROMPT}, "safe_suffix": SAFE_SUFFIX}
    recs: list[Record] = []
    if na:
        want = int(na * 2) + 8 if filter_refusals else na
        if harmful_instructions is None:
            ins, st = generate_instructions(generator, HARMFUL_INSTRUCTION_PROMPT, want, seed=seed, exclude=exclude)
        else:
            skip = exclude or set()
            ins = [i for i in harmful_instructions if i.lower() not in skip][:want]
            prov["instruction_prompts"]["harmful"] = f"given: {len(ins)} held-out harmful prompts"
        resp = generate_responses(generator, ins, SAFE_SUFFIX, max_new_tokens=max_new_tokens, seed=seed)
        pairs = _refusal_filtered(ins, resp, judge, keep_refusals=True, on=filter_refusals, prov=prov, role="aligned")
        recs += [Record(instruction=i, response=r, kind="aligned", source=f"{source}-aligned") for i, r in pairs[:na]]
    if nn:
        # a few spare instructions for the answers the refusal filter drops (a few percent with the 135M model)
        want = nn + nn // 10 + 2 if filter_refusals else nn
        ins, st = generate_instructions(generator, NORMAL_INSTRUCTION_PROMPT, want, seed=seed + 1, exclude=exclude)
        resp = generate_responses(generator, ins, "", max_new_tokens=max_new_tokens, seed=seed)
        pairs = _refusal_filtered(ins, resp, judge, keep_refusals=False, on=filter_refusals, prov=prov, role="normal")
        recs += [Record(instruction=i, response=r, kind="normal", source=f"{source}-normal") for i, r in pairs[:nn]]
    prov["aligned"] = sum(r.kind == "aligned" for r in recs)
    prov["normal"] = sum(r.kind == "normal" for r in recs)
    if prov["aligned"] == 0 and na:
        raise FedsafeError("the generator produced no usable safe responses (all filtered); "
                           "use another generator or defense.filter_refusals=false")
    random.Random(seed).shuffle(recs)
    if cache is not None:
        write_jsonl(cache, [r.to_dict() for r in recs])
        atomic_write_json(cache.with_suffix(".json"), prov)
    return recs, prov


def _refusal_filtered(ins: list[str], resp: list[str], judge: str, *, keep_refusals: bool, on: bool, prov: dict,
                      role: str) -> list[tuple[str, str]]:
    """Non-empty (instruction, answer) pairs; with ``on``, only those whose answer the judge calls a refusal
    (``keep_refusals``) or not. Counts go to ``prov`` as ``{role}_generated`` / ``{role}_after_refusal_filter``."""
    pairs = [(i, r) for i, r in zip(ins, resp) if r.strip()]
    prov[f"{role}_generated"] = len(pairs)
    if on and pairs:
        v = get_judge(judge).judge([p[0] for p in pairs], [p[1] for p in pairs])
        pairs = [p for p, x in zip(pairs, v) if (x.label == "safe") == keep_refusals]
        prov[f"{role}_after_refusal_filter"] = len(pairs)
    return pairs


RECOVERY_SEED = 3_000_017  # seeds the choice of recovery examples and their prefix lengths


def with_recovery(recs: list[Record], prov: dict, fed: Federation, share: float, max_tokens: int, tokenizer,
                  seed: int) -> tuple[list[Record], dict]:
    """Replace ``share`` of the aligned examples by safety-recovery examples (Qi et al., ICLR 2025, §3).

    Qi et al. train on triplets (harmful prompt x, harmful answer h, refusal r) as ``-log p(r | x, h_<=k)``:
    the response opens with the first k tokens of the harmful answer and then recovers into a refusal, the
    loss falling on the refusal only, so that safety does not hinge on the first few output tokens. They mix
    these with ordinary refusals (k = 0) and draw k uniformly up to a cap C (as we read their method; no code
    of theirs is used); here ``share`` sets the mixture and
    ``max_tokens`` is C (capped below the answer's length). x and h come from held-out unaligned records (the
    malicious sources' part no client received: the server's red-team set, as the update classifier's); r is
    the offline safe response for x (the same generator as the aligned data). The harmful opening is stored
    in the response with ``meta["loss_from"]`` (its length in characters), which tokenisation turns into
    ignored labels. The total and aligned counts stay those of the level; ``share = 0`` returns ``recs``
    unchanged.
    """
    aligned_at = [i for i, r in enumerate(recs) if r.kind == "aligned"]
    k = int(round(len(aligned_at) * share))
    if k == 0:
        return recs, prov
    pool = sorted((r for v in fed.heldout.values() for r in v if r.kind == "unaligned"), key=lambda r: r.id)
    if len(pool) < k:
        raise FedsafeError(f"defense.recovery_share={share} needs {k} held-out harmful answers (unaligned records no "
                           f"client received) to build recovery examples from, found {len(pool)}; lower "
                           "defense.recovery_share or give the malicious sources more records")
    rng = random.Random(derive_seed(seed, RECOVERY_SEED))
    out, lengths = list(recs), []
    for i, h in zip(rng.sample(aligned_at, k), rng.sample(pool, k)):
        ids = tokenizer(h.response, add_special_tokens=False)["input_ids"]
        n = rng.randint(1, max(1, min(max_tokens, len(ids) - 1)))
        opening = tokenizer.decode(ids[:n])
        refusal = safe_response(h.instruction, key=h.id)
        response = opening + ("" if opening.endswith((" ", "\n")) else " ") + refusal
        out[i] = Record(h.instruction, response, "aligned", f"recovery:{h.source}",
                        {"loss_from": len(opening), "harmful_prefix_tokens": n, "recovery_of": h.id})
        lengths.append(n)
    prov = dict(prov, recovery={"examples": k, "share": share, "max_tokens": max_tokens, "pool_unaligned": len(pool),
                                "prefix_tokens_mean": sum(lengths) / k, "method": "Qi et al. 2025 safety recovery"})
    return out, prov
