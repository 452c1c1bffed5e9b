"""Human-readable view of a federation (``fedsafe data inspect CONFIG``).

:func:`inspect_federation` returns a rich renderable (tables) when ``rich`` is installed, else plain
text; :func:`format_federation` always gives plain text (logs, tests).
"""

from __future__ import annotations

from typing import Any

from .partition import Federation


def _kinds(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d["by_kind"].items()) or "-"


def _sources(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d["by_source"].items()) or "-"


def _lens(d: dict[str, Any], key: str) -> str:
    s = d[key]
    return f"{s['min']}/{s['median']:g}/{s['max']}"


def _rows(fed: Federation) -> tuple[list[list[str]], list[list[str]]]:
    s = fed.summary()
    clients = [
        [str(c["id"]), c["group"] + (" (M)" if c["malicious"] else ""), str(c["n"]), str(c["unique"]), _kinds(c), _sources(c),
         _lens(c, "instruction_chars"), _lens(c, "response_chars")]
        for c in s["clients"]
    ]
    sets = [[name, str(s[name]["n"]), _kinds(s[name]), _sources(s[name]), _lens(s[name], "instruction_chars"), _lens(s[name], "response_chars")]
            for name in ("eval_harmful", "eval_benign", "probe_harmful", "probe_benign")]
    sets += [[f"heldout {spec}", str(d["n"]), _kinds(d), _sources(d), _lens(d, "instruction_chars"), _lens(d, "response_chars")]
             for spec, d in s["heldout"].items()]
    return clients, sets


FILE_HEAD = ["spec", "format", "recognised", "kind", "rows", "kept", "dropped (why)"]


def _file_rows(fed: Federation) -> list[list[str]]:
    return [[spec, r["format"], r["mapping"], r["kind"], str(r["rows"]), str(r["kept"]),
             ", ".join(f"{n} {why}" for why, n in r["dropped"].items()) or "-"] for spec, r in fed.files.items()]


CLIENT_HEAD = ["id", "group", "n", "unique", "kinds", "sources", "instr chars min/med/max", "resp chars min/med/max"]
SET_HEAD = ["set", "n", "kinds", "sources", "instr chars min/med/max", "resp chars min/med/max"]


def format_federation(fed: Federation) -> str:
    clients, sets = _rows(fed)

    def table(head: list[str], rows: list[list[str]]) -> str:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])

    parts = [f"split={fed.split} seed={fed.seed} malicious={fed.malicious_ids}", "", table(CLIENT_HEAD, clients), "", table(SET_HEAD, sets)]
    if fed.files:
        parts += ["", "local files:", table(FILE_HEAD, _file_rows(fed))]
    if fed.notes:
        parts += ["", "notes:"] + [f"  - {n}" for n in fed.notes]
    return "\n".join(parts)


def inspect_federation(fed: Federation, plain: bool = False) -> Any:
    """Rich tables (or plain text when ``plain`` or rich is missing) describing every client and set."""
    if plain:
        return format_federation(fed)
    try:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return format_federation(fed)
    clients, sets = _rows(fed)
    t1 = Table(title=f"clients (split={fed.split}, seed={fed.seed}, malicious={fed.malicious_ids})")
    for h in CLIENT_HEAD:
        t1.add_column(h, overflow="fold")
    for r, c in zip(clients, fed.clients):
        t1.add_row(*r, style="red" if c.malicious else None)
    t2 = Table(title="server-side sets")
    for h in SET_HEAD:
        t2.add_column(h, overflow="fold")
    for r in sets:
        t2.add_row(*r)
    items: list[Any] = [t1, t2]
    if fed.files:
        t3 = Table(title="local files: what was recognised, rows kept and dropped")
        for h in FILE_HEAD:
            t3.add_column(h, overflow="fold")
        for r in _file_rows(fed):
            t3.add_row(*r)
        items.append(t3)
    if fed.notes:
        items.append(Text("notes:\n" + "\n".join(f"  - {n}" for n in fed.notes)))
    return Group(*items)
