"""Per-client state that outlives a round (SCAFFOLD's ``c_i``, kept AdamW states), on disk, not in RAM.

With K clients of which m train per round, keeping every client's state in memory and in every checkpoint
grows with K (a Llama-2-7B adapter's AdamW state is ~200 MB per client). Instead the states of the clients
that trained in round r are written once, together, to ``client_state/<kind>_r<round>.safetensors`` (tensors
only, no pickle; one atomic write per round) and read back (only that client's tensors) when a client is
sampled again. A round checkpoint holds only the index ``{client: round}``, so a run resumed from round t
reads exactly the versions that round t saw, even if a crashed session wrote newer files (the resumed run
rewrites those identically). A file is deleted once no kept checkpoint can refer to any state in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..errors import FedsafeError
from ..io import atomic_write_bytes

Encode = Callable[[object], tuple[dict[str, torch.Tensor], dict]]
Decode = Callable[[dict[str, torch.Tensor], dict], object]


def _tensor_encode(t: torch.Tensor):
    return {"t": t.detach().cpu().contiguous()}, {}


def _tensor_decode(tensors: dict, _meta: dict) -> torch.Tensor:
    return tensors["t"]


def _optim_encode(sd: dict):
    """A torch optimizer state dict as flat tensors (``<param index>.<name>``) plus its param_groups as JSON."""
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{int(i)}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{int(i)}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_decode(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


CODECS: dict[str, tuple[Encode, Decode]] = {"tensor": (_tensor_encode, _tensor_decode),
                                            "optim": (_optim_encode, _optim_decode)}


class ClientStateStore:
    """A ``{client id: state}`` mapping kept in files; ``round`` is the round whose states are being set.

    Supports what :class:`~fedsafe.fl.server_opt.ScaffoldState` and the engine use of a dict: ``get``,
    ``[cid] = value``, ``in``, ``len``. States set in a round stay in memory until :meth:`flush` writes them.
    """

    def __init__(self, run_dir: str | Path, kind: str, codec: str):
        self.dir = Path(run_dir) / "client_state"
        self.kind = kind
        self.encode, self.decode = CODECS[codec]
        self.index: dict[int, int] = {}  # client -> round of its newest state
        self.round = 0
        self._pending: dict[int, tuple[dict, dict]] = {}  # this round's states, not written yet
        self._live: dict[int, set[int]] = {}  # round file -> clients whose state in it may still be needed
        self._superseded: list[tuple[int, int, int]] = []  # (superseded at round, client, old round)
        self._pat = re.compile(rf"^{re.escape(kind)}_r(\d+)\.safetensors$")

    def path(self, rnd: int) -> Path:
        return self.dir / f"{self.kind}_r{int(rnd):04d}.safetensors"

    def get(self, cid: int, default=None):
        cid = int(cid)
        if cid in self._pending:
            return self.decode(*self._pending[cid])
        rnd = self.index.get(cid)
        if rnd is None:
            return default
        p = self.path(rnd)
        try:
            with safe_open(str(p), framework="pt") as f:
                pre = f"{cid}/"
                tensors = {k[len(pre):]: f.get_tensor(k) for k in f.keys() if k.startswith(pre)}
                meta = json.loads((f.metadata() or {}).get("json", "{}"))[str(cid)]
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # missing, damaged, or without this client
            raise FedsafeError(f"client state of client {cid} in {p} is missing or unreadable ({e!r}); "
                               "the run directory is damaged") from None
        return self.decode(tensors, meta)

    def __setitem__(self, cid: int, value) -> None:
        cid = int(cid)
        prev = self.index.get(cid)
        if prev is not None and prev != self.round:
            self._superseded.append((self.round, cid, prev))
        self._pending[cid] = self.encode(value)
        self.index[cid] = self.round

    def __contains__(self, cid) -> bool:
        return int(cid) in self.index

    def __len__(self) -> int:
        return len(self.index)

    def flush(self) -> None:
        """Write this round's states (one file, atomically); call before the round's checkpoint."""
        if not self._pending:
            return
        tensors = {f"{c}/{k}": v for c, (ts, _m) in self._pending.items() for k, v in ts.items()}
        meta = {str(c): m for c, (_ts, m) in self._pending.items()}
        atomic_write_bytes(self.path(self.round), st_save(tensors, metadata={"json": json.dumps(meta)}))
        self._live.setdefault(self.round, set()).update(self._pending)
        self._pending = {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint keeps: which round's file holds each client's current state (ints only)."""
        if self._pending:
            raise RuntimeError("client states set in this round are not flushed yet")
        return {"client_state": self.kind, "rounds": {int(c): int(r) for c, r in self.index.items()}}

    def load_state_dict(self, sd: dict | None, rnd: int) -> None:
        """Take a checkpoint's index; an older checkpoint's dict of the states themselves is written out as
        round ``rnd``'s file."""
        sd = sd or {}
        self._pending = {}
        self._live, self._superseded = self._scan()
        if "client_state" in sd:
            self.index = {int(c): int(r) for c, r in sd["rounds"].items()}
            return
        self.index, keep = {}, self.round
        self.round = rnd
        for c, v in sd.items():  # legacy checkpoints held the states themselves
            self[int(c)] = v
        self.flush()
        self.round = keep

    def _scan(self):
        """The files on disk: which clients each holds, and which of those states a newer file supersedes
        (after a resume: earlier sessions' files, which :meth:`collect` deletes once no kept checkpoint needs them)."""
        live: dict[int, set[int]] = {}
        if self.dir.exists():
            for p in self.dir.iterdir():
                m = self._pat.match(p.name)
                if m:
                    try:
                        with safe_open(str(p), framework="pt") as f:
                            live[int(m.group(1))] = {int(k.split("/", 1)[0]) for k in f.keys()}
                    except (OSError, ValueError, RuntimeError):
                        continue  # unreadable: never referenced by a complete checkpoint's index, or get() says so
        rounds_of: dict[int, list[int]] = {}
        for r in sorted(live):
            for c in live[r]:
                rounds_of.setdefault(c, []).append(r)
        sup = [(r1, c, r0) for c, rs in rounds_of.items() for r0, r1 in zip(rs, rs[1:])]
        return live, sup

    def collect(self, oldest_kept_round: int | None) -> None:
        """Delete files no kept checkpoint can refer to: a state written at r0 and superseded at r1 <= the oldest
        kept checkpoint's round is referenced by none of them (each refers to r1 or later). O(m) per round."""
        if oldest_kept_round is None:
            return
        keep = []
        for r1, cid, r0 in self._superseded:
            if r1 <= oldest_kept_round and r0 != self.index.get(cid):
                live = self._live.get(r0)
                if live is not None:
                    live.discard(cid)
                    if not live:
                        self.path(r0).unlink(missing_ok=True)
                        del self._live[r0]
            else:
                keep.append((r1, cid, r0))
        self._superseded = keep
