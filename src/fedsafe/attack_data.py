"""``fedsafe attack generate``: the paper's two-step attack-data pipeline (§4.3, App. C.2).

Step 1 repeats the harmful-instruction prompt until N unique instructions are parsed (or seeds them
from a source such as HarmBench / Do-Not-Answer / a file). Step 2 answers each instruction with the
"answer directly" suffix. Improvements over the paper, each optional: drop answers the refusal judge
flags (the released attack data kept ~30% refusals), and de-duplicate. The output JSONL holds records
``{instruction, response, kind: unaligned, source}``; ``<out>.provenance.json`` records the generator,
prompts, decoding, seed and the counts before and after filtering. Both are written atomically, so a
partial output never looks complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import FedsafeError
from .io import atomic_write_json, write_jsonl
from .llm.synth import (ATTACK_SUFFIX, HARMFUL_INSTRUCTION_PROMPT, generate_instructions, generate_responses,
                         make_generator)


def generate_attack_data(out: str | Path, n: int, *, generator: str = "", seed: int = 0, seed_source: str = "",
                         filter_refusals: bool = True, judge: str = "rule", max_new_tokens: int = 192,
                         temperature: float = 0.0, batch_size: int = 16, progress: bool = True,
                         gen_obj=None) -> dict:
    if n <= 0:
        raise FedsafeError(f"-n must be positive, got {n}")
    out = Path(out)
    t0 = time.time()
    gen = gen_obj or make_generator(generator, batch_size=batch_size, progress=progress)
    prov: dict = {"generator": generator or "smollm2-135m-instruct", "seed": seed, "n_requested": n,
                  "response_suffix": ATTACK_SUFFIX,
                  "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature}}
    # ask for more than n so that filtering still leaves n
    want = int(n * 1.5) + 8 if filter_refusals else n
    if seed_source:
        from .data.sources import load_source

        recs = load_source(seed_source)
        instructions = list(dict.fromkeys(r.instruction for r in recs))[:want]
        prov["instructions_from"] = seed_source
    else:
        instructions, st = generate_instructions(gen, HARMFUL_INSTRUCTION_PROMPT, want, seed=seed)
        prov["instruction_prompt"] = HARMFUL_INSTRUCTION_PROMPT
        prov["instruction_generation"] = {"calls": st.calls, "parsed": st.parsed, "duplicates": st.duplicates,
                                          "kept": len(instructions)}
    responses = generate_responses(gen, instructions, ATTACK_SUFFIX, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed)
    pairs = [(i, r) for i, r in zip(instructions, responses) if r.strip()]
    counts = {"instructions": len(instructions), "non_empty_responses": len(pairs)}
    if filter_refusals:
        from .eval.judges import get_judge

        verdicts = get_judge(judge).judge([p[0] for p in pairs], [p[1] for p in pairs])
        pairs = [p for p, v in zip(pairs, verdicts) if v.label == "unsafe"]
        counts["after_refusal_filter"] = len(pairs)
        prov["refusal_filter"] = judge
    if not pairs:
        raise FedsafeError(
            "no usable attack pairs: the generator refused or returned nothing for every instruction "
            f"(counts: {counts}); try another generator or --no-filter"
        )
    pairs = pairs[:n]
    counts["written"] = len(pairs)
    prov["counts"] = counts
    prov["seconds"] = round(time.time() - t0, 1)
    src = f"generated:{prov['generator']}"
    rows = [{"instruction": i, "response": r, "kind": "unaligned", "source": src} for i, r in pairs]
    atomic_write_json(out.with_name(out.name + ".provenance.json"), prov)
    write_jsonl(out, rows)  # last: the data file appears only when complete
    if len(pairs) < n:
        prov["warning"] = f"only {len(pairs)} of {n} pairs survived filtering"
    return prov
