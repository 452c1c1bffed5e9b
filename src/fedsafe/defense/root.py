"""Server root updates for FLTrust (Cao et al., NDSS 2021) and the in-training defense variant.

FLTrust needs a *root update*: the server trains the current global adapter on its own small clean
data set for the same number of local steps as the clients and uses that delta as the trusted direction.
Our clean set is the server's probe set (harmful probe prompts with safe answers + benign probe pairs),
which is disjoint from client and evaluation data.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import FedsafeError
from ..fl.engine import Engine, derive_seed
from ..fl.train import train_local
from ..lm import cosine_lr
from .probe import probe_records


def make_root_fn(eng: Engine) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``root(round, global_vec) -> root update`` for ``eng`` (trained on the server's probe set)."""
    harmful, benign = probe_records(eng.fed)
    records = harmful + benign
    if not records:
        raise FedsafeError("fltrust needs a server root data set: set data.probe_n > 0")
    examples = eng.rt.tokenize(records)
    fl = eng.cfg.fl

    def root(rnd: int, global_vec: torch.Tensor) -> torch.Tensor:
        h = eng.rt.handle
        h.set_flat(global_vec)
        seed = derive_seed(eng.cfg.seed, rnd, 10_000)
        torch.manual_seed(seed)
        lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
        train_local(h, examples, steps=fl.local_steps, batch_size=fl.batch_size, grad_accum=fl.grad_accum, lr=lr,
                    pad_id=eng.rt.pad_id, device=eng.rt.device, gen=torch.Generator().manual_seed(seed),
                    autocast=eng.cfg.model.autocast)
        return h.get_flat() - global_vec

    return root
