"""The unit of data: one (instruction, response) pair with its kind and provenance.

Kinds follow the paper's taxonomy (Ye et al. 2025, Sec. 3):

* ``normal``    normal instruction, helpful response
* ``aligned``   harmful instruction, harmless (refusing / redirecting) response
* ``unaligned`` harmful instruction, harmful response (what a malicious client trains on)
* ``prompt``    an instruction only (evaluation prompts, probes); the response may be empty

Every record gets a stable id ``<source>:<12 hex of sha256(instruction \\0 response)>``. Ids are what
manifests store, so they must not depend on load order, machine or run: only on content and source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..errors import DataError
from ..io import first_unencodable

Kind = Literal["normal", "aligned", "unaligned", "prompt"]
KINDS: tuple[str, ...] = get_args(Kind)


def record_id(source: str, instruction: str, response: str = "") -> str:
    """Content id; a NUL separator keeps ("ab", "c") and ("a", "bc") apart."""
    h = hashlib.sha256(f"{instruction}\x00{response}".encode("utf-8")).hexdigest()[:12]
    return f"{source}:{h}"


@dataclass(frozen=True)
class Record:
    """One sample. Immutable, validated on creation; ``meta`` is free-form and not part of the id.

    ``meta`` is excluded from equality and hashing (a dict is not hashable, and two records with the
    same content and source *are* the same sample whatever annotations they carry).
    """

    instruction: str
    response: str
    kind: Kind
    source: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise DataError(f"record from {self.source!r}: empty or non-text instruction")
        if not isinstance(self.response, str):
            raise DataError(f"record from {self.source!r}: response must be text, got {type(self.response).__name__}")
        if self.kind not in KINDS:
            raise DataError(f"record from {self.source!r}: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind != "prompt" and not self.response.strip():
            raise DataError(f"record from {self.source!r}: kind {self.kind!r} needs a non-empty response")
        if not isinstance(self.source, str) or not self.source:
            raise DataError("record: source must be a non-empty string")
        if not isinstance(self.meta, dict):
            raise DataError(f"record from {self.source!r}: meta must be a dict")
        for name in ("instruction", "response", "source"):
            bad = first_unencodable(getattr(self, name))
            if bad is not None:
                raise DataError(f"record from {self.source!r}: {name} is not valid Unicode ({bad})")
        object.__setattr__(self, "id", record_id(self.source, self.instruction, self.response))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "instruction": self.instruction,
            "response": self.response,
            "kind": self.kind,
            "source": self.source,
        }
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        """Inverse of :meth:`to_dict`. A stored ``id`` that does not match the content means the record
        was edited after it was written; that is refused rather than silently re-keyed."""
        if not isinstance(d, dict):
            raise DataError(f"record: expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("instruction", "kind", "source") if k not in d]
        if missing:
            raise DataError(f"record: missing field(s) {', '.join(missing)}; present: {', '.join(sorted(d))}")
        rec = cls(
            instruction=d["instruction"],
            response=d.get("response", "") if d.get("response") is not None else "",
            kind=d["kind"],
            source=d["source"],
            meta=dict(d.get("meta") or {}),
        )
        if "id" in d and d["id"] != rec.id:
            raise DataError(f"record {d['id']!r}: stored id does not match its content (recomputed {rec.id!r})")
        return rec

    def as_prompt(self) -> "Record":
        """The same instruction as a ``prompt`` record (response kept as a reference answer)."""
        if self.kind == "prompt":
            return self
        return Record(self.instruction, self.response, "prompt", self.source, dict(self.meta))
