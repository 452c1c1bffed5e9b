"""Evaluation-set contamination: exact and near-duplicate instruction matching.

An evaluation prompt that also appears (perhaps reworded a little) in some client's or the server's
training data makes refusal numbers meaningless, and the public sources overlap: StrongREJECT includes
25 AdvBench prompts, and the many-shot user turns are HarmBench behaviours.

Two tests, on instructions only:

* **exact**: equal after :func:`normalize` (lowercase, punctuation dropped, whitespace collapsed);
* **near**: Jaccard similarity of word k-shingles (default k=3) >= ``threshold`` (default 0.8).

Near matching uses an inverted index with *prefix filtering*: if J(A, B) >= t then, under any fixed
global order of shingles, the first ``|A| - ceil(t|A|) + 1`` shingles of A and the first
``|B| - ceil(t|B|) + 1`` of B share at least one shingle. Only eval prefixes are indexed and only
candidate prefixes are looked up, and every candidate pair is then verified exactly, so nothing is
approximate. Rare shingles come first in the order to keep candidate lists short.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..errors import DataError
from .records import Record

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lowercase, replace every non-alphanumeric run by one space, strip."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def shingles(text: str, k: int = 3) -> frozenset[str]:
    """Word k-shingles of the normalised text; a text shorter than k words is one shingle."""
    words = normalize(text).split()
    if not words:
        return frozenset()
    if len(words) <= k:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass(frozen=True)
class Overlap:
    """One evaluation record matched by one training record held by ``owner``."""

    eval_id: str
    train_id: str
    owner: str
    match: str  # "exact" | "near"
    score: float  # 1.0 for exact
    eval_text: str
    train_text: str

    def describe(self, width: int = 70) -> str:
        def cut(s: str) -> str:
            s = " ".join(s.split())
            return s if len(s) <= width else s[: width - 3] + "..."

        return f"[{self.owner}] {self.match} (J={self.score:.2f}): eval {cut(self.eval_text)!r} ~ train {cut(self.train_text)!r}"


class ContaminationIndex:
    """Index over evaluation records; :meth:`matches` finds those a training text duplicates."""

    def __init__(self, eval_records: Sequence[Record], threshold: float = 0.8, k: int = 3):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.records = list(eval_records)
        self.threshold = threshold
        self.k = k
        self._exact: dict[str, list[int]] = {}
        self._sh: list[frozenset[str]] = []
        for i, r in enumerate(self.records):
            self._exact.setdefault(normalize(r.instruction), []).append(i)
            self._sh.append(shingles(r.instruction, k))
        # global order: eval-side frequency ascending (rare first), ties by the shingle text
        self._freq = Counter(s for sh in self._sh for s in sh)
        self._prefix: dict[str, list[int]] = {}
        for i, sh in enumerate(self._sh):
            for s in self._prefix_of(sh):
                self._prefix.setdefault(s, []).append(i)

    def _order_key(self, s: str) -> tuple[int, str]:
        # shingles unseen on the eval side sort first; they can never be shared, which is fine:
        # the prefix bound holds for any fixed total order
        return (self._freq.get(s, 0), s)

    def _prefix_of(self, sh: frozenset[str]) -> list[str]:
        n = len(sh)
        if n == 0:
            return []
        p = n - math.ceil(self.threshold * n - 1e-9) + 1
        return sorted(sh, key=self._order_key)[:p]

    def matches(self, text: str) -> list[tuple[int, str, float]]:
        """(eval index, "exact"|"near", score) for every eval record that ``text`` duplicates."""
        out: dict[int, tuple[str, float]] = {}
        for i in self._exact.get(normalize(text), ()):
            out[i] = ("exact", 1.0)
        sh = shingles(text, self.k)
        if sh:
            cands: set[int] = set()
            for s in self._prefix_of(sh):
                cands.update(self._prefix.get(s, ()))
            for i in cands:
                if i in out:
                    continue
                other = self._sh[i]
                # size filter: J >= t needs t <= |small|/|large|
                lo, hi = sorted((len(sh), len(other)))
                if lo < self.threshold * hi - 1e-9:
                    continue
                j = jaccard(sh, other)
                if j >= self.threshold:
                    out[i] = ("near", j)
        return [(i, m, s) for i, (m, s) in sorted(out.items())]

    def is_contaminated(self, text: str) -> bool:
        return bool(self.matches(text))


def check_contamination(
    eval_records: Sequence[Record],
    train_records_by_owner: Mapping[str, Iterable[Record]],
    threshold: float = 0.8,
    k: int = 3,
) -> list[Overlap]:
    """Every (eval record, training record) pair that matches, for each owner ("client 3", "heldout:X")."""
    index = ContaminationIndex(eval_records, threshold=threshold, k=k)
    found: list[Overlap] = []
    for owner, records in train_records_by_owner.items():
        seen: set[str] = set()  # upsampled duplicates would repeat the same overlap
        for r in records:
            if r.id in seen:
                continue
            seen.add(r.id)
            for i, match, score in index.matches(r.instruction):
                e = index.records[i]
                found.append(Overlap(e.id, r.id, str(owner), match, score, e.instruction, r.instruction))
    return found


def remove_contaminated(
    eval_records: Sequence[Record], records: Sequence[Record], threshold: float = 0.8, k: int = 3,
    index: ContaminationIndex | None = None,
) -> tuple[list[Record], list[Record]]:
    """Split ``records`` into (clean, removed) against the evaluation records; order is kept."""
    index = index or ContaminationIndex(eval_records, threshold=threshold, k=k)
    clean: list[Record] = []
    removed: list[Record] = []
    for r in records:
        (removed if index.is_contaminated(r.instruction) else clean).append(r)
    return clean, removed


def assert_no_contamination(
    eval_records: Sequence[Record],
    train_records_by_owner: Mapping[str, Iterable[Record]],
    threshold: float = 0.8,
    what: str = "training data",
    show: int = 5,
) -> None:
    """Raise :class:`DataError` listing the first overlaps if any eval prompt appears in the data.

    Use this for data that does not go through ``build_federation``, e.g. a defense data set built
    later: ``assert_no_contamination(fed.eval_harmful + fed.eval_benign, {"defense": records})``.
    """
    overlaps = check_contamination(eval_records, train_records_by_owner, threshold=threshold)
    if overlaps:
        lines = "\n  ".join(o.describe() for o in overlaps[:show])
        more = f"\n  ... and {len(overlaps) - show} more" if len(overlaps) > show else ""
        raise DataError(
            f"{len(overlaps)} evaluation prompt overlap(s) with {what} (Jaccard >= {threshold} or exact):\n  "
            f"{lines}{more}\nRemove them, or set allow_contamination: true to accept this deliberately."
        )
