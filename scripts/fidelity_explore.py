"""Explore demo protocols for issue 15: does a setting show the paper's findings?

One process, one loaded model. For a variant (a preset plus dotted overrides) it trains the scenarios
asked for (clean FedAvg, attacked FedAvg, attacked + a rule, ...) on the same federation and seed,
evaluates each on the same held-out prompts, and prints rates with the exact McNemar test against the
clean run. Every result is appended to ``docs/fidelity_runs.jsonl`` so no configuration is tried twice.

    python scripts/fidelity_explore.py --tag E1 --scenarios start,clean,attack \
        data.eval_harmful_n=290 fl.rounds=10
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedsafe.config import load_config
from fedsafe.demo import ROBUST, ROBUST_FULL, scenario_configs
from fedsafe.eval.runner import evaluate_adapter
from fedsafe.pipeline import build_engine, shared_start

ROOT = Path(__file__).resolve().parents[1]
ROBUST_PARAMS = {rule: params for _, rule, params in ROBUST + ROBUST_FULL}  # the demo's (f = 1 for DnC, Krum)


def mcnemar_p(a: int, b: int) -> float:
    """Two-sided exact McNemar p-value for a:b discordant pairs."""
    n = a + b
    if n == 0:
        return 1.0
    k = min(a, b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--scenarios", default="start,clean,attack",
                    help="comma list of: start, clean, attack, attack_<rule>, dose<k> (k malicious per round)")
    ap.add_argument("--note", default="")
    ap.add_argument("--log", default=str(ROOT / "docs" / "fidelity_runs.jsonl"))
    ap.add_argument("--merge-start", action="store_true",
                    help="fold the server-aligned start into the base weights and federate a fresh LoRA on it "
                         "(the paper's setting: a fresh LoRA on a safety-aligned base)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    # the product's merged start (init.merge): the runtime then knows what is folded into its base, which
    # the generation cache needs to tell two starts apart
    base = load_config(a.preset, a.overrides + (["init.merge=true"] if a.merge_start else []))
    tmp = Path(tempfile.mkdtemp(prefix=f"fid-{a.tag}-"))
    start = shared_start(base, tmp / "start", progress=False)  # clean and attacked runs share one start
    scen = {slug: cfg for slug, _, cfg in scenario_configs(base, rules=[], start=start)}
    wanted = a.scenarios.split(",")
    for w in wanted:
        if w.startswith("dose"):  # attacked FedAvg with exactly k malicious clients in every round
            c = copy.deepcopy(base)
            c.fl.sampling, c.fl.malicious_per_round = "stratified", int(w[4:])
            scen[w] = dataclasses.replace(c, name=w).validate()
        if w.startswith("attack_") and w not in scen:
            c = copy.deepcopy(base)
            c.fl.aggregator = w[len("attack_"):]
            c.fl.aggregator_params = dict(ROBUST_PARAMS.get(c.fl.aggregator, {}))  # as the demo sets them
            scen[w] = dataclasses.replace(c, name=w).validate()
    results: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for w in wanted:
        slug = {"clean": "clean_fedavg", "attack": "attack_fedavg"}.get(w, w)
        cfg = scen["clean_fedavg" if w == "start" else slug]
        t0 = time.time()
        eng = build_engine(cfg, tmp / slug, progress=False)
        (tmp / slug).mkdir(parents=True, exist_ok=True)
        t_init = time.time() - t0
        vec = eng.init_vec if w == "start" else eng.run()
        t_train = time.time() - t0 - t_init
        e = cfg.eval
        t1 = time.time()
        res = evaluate_adapter(eng.rt, vec, eng.fed.eval_harmful, eng.fed.eval_benign, judge=e.judge,
                               max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=cfg.seed,
                               out_dir=tmp / slug / "eval")
        t_eval = time.time() - t1
        rows = {}
        for name in ("harmful", "benign"):
            for line in (tmp / slug / "eval" / f"{name}.jsonl").read_text().splitlines():
                r = json.loads(line)
                rows[(name, r["id"])] = r["label"] == "safe"
        verdicts[w] = rows
        losses = []
        mpath = tmp / slug / "metrics.jsonl"
        if mpath.exists():
            for line in mpath.read_text().splitlines():
                m = json.loads(line)
                losses.append(m.get("client_loss") or m.get("losses"))
        out = {"refusal": res["refusal"]["rate"], "n_harmful": res["refusal"]["n"],
               "false_refusal": res["false_refusal"]["rate"], "n_benign": res["false_refusal"]["n"],
               "ref_nll": res["ref_nll"], "t_init": round(t_init, 1), "t_train": round(t_train, 1),
               "t_eval": round(t_eval, 1)}
        if w != "clean" and "clean" in verdicts:
            for name, key in (("harmful", "refusal"), ("benign", "false_refusal")):
                ids = [k for k in rows if k[0] == name]
                b_only = sum(verdicts["clean"][k] and not rows[k] for k in ids)
                o_only = sum(rows[k] and not verdicts["clean"][k] for k in ids)
                out[f"{key}_vs_clean"] = {"clean_only": b_only, "this_only": o_only, "p": mcnemar_p(b_only, o_only)}
        results[w] = out
        print(json.dumps({"tag": a.tag, "scenario": w, **out}), flush=True)
        with open(a.log, "a") as f:
            preset = a.preset
            if Path(preset).is_file():  # log the YAML itself, never a path of this machine
                preset = yaml.safe_load(Path(preset).read_text())
            f.write(json.dumps({"tag": a.tag, "scenario": w, "preset": preset, "overrides": a.overrides,
                                "note": a.note, "merge_start": a.merge_start, "when": time.strftime("%Y-%m-%d %H:%M"), **out,
                                "losses": losses}) + "\n")
    print(f"outputs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
