"""Server-side update rules (FedOpt family) applied to the aggregated client delta.

The robust rule (``fedsafe.aggregators``) turns the clients' updates into one delta ``d``; the server
optimiser then moves the global adapter ``x``. With ``d`` the pseudo-gradient's negative
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021):

* fedavg / fedprox / scaffold:  x <- x + eta * d            (eta = 1 for plain FedAvg)
* fedavgm:     v <- beta*v + d;                 x <- x + eta * v        (Hsu et al. 2019)
* fedadagrad:  m <- b1*m + (1-b1) d;  v <- v + d^2;                       x <- x + eta * m / (sqrt(v) + tau)
* fedyogi:     m as above;  v <- v - (1-b2) d^2 sign(v - d^2);            x <- x + eta * m / (sqrt(v) + tau)
* fedadam:     m as above;  v <- b2*v + (1-b2) d^2;                       x <- x + eta * m / (sqrt(v) + tau)

SCAFFOLD's control variates live in :class:`ScaffoldState` (Karimireddy et al. 2020, option II).
The paper's code never updated the aggregated weights in its SCAFFOLD branch; ours does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADAPTIVE = ("fedadagrad", "fedyogi", "fedadam")


@dataclass
class ServerOptimizer:
    alg: str = "fedavg"
    eta: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    state: dict = field(default_factory=dict)

    def step(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Return the new global vector given the aggregated delta ``d``."""
        a = self.alg
        if a in ("fedavg", "fedprox", "scaffold"):
            return x + self.eta * d
        if a == "fedavgm":
            v = self.state.get("v")
            v = d.clone() if v is None else self.momentum * v + d
            self.state["v"] = v
            return x + self.eta * v
        if a in ADAPTIVE:
            m = self.state.get("m")
            m = (1 - self.beta1) * d if m is None else self.beta1 * m + (1 - self.beta1) * d
            d2 = d * d
            v = self.state.get("v")
            if v is None:
                v = torch.full_like(d, self.tau**2)  # Reddi et al. initialise v_0 = tau^2
            if a == "fedadagrad":
                v = v + d2
            elif a == "fedyogi":
                v = v - (1 - self.beta2) * d2 * torch.sign(v - d2)
            else:
                v = self.beta2 * v + (1 - self.beta2) * d2
            self.state["m"], self.state["v"] = m, v
            return x + self.eta * m / (v.sqrt() + self.tau)
        raise ValueError(f"unknown server algorithm {a!r}")

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, sd: dict) -> None:
        self.state = {k: v.clone() for k, v in sd.items()}


@dataclass
class ScaffoldState:
    """Server control variate ``c`` and each client's ``c_i`` (zeros until first trained)."""

    c: torch.Tensor
    ci: dict[int, torch.Tensor] = field(default_factory=dict)

    def correction(self, cid: int) -> torch.Tensor:
        ci = self.ci.get(cid)
        return self.c.clone() if ci is None else self.c - ci

    def client_update(self, cid: int, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """Option II: c_i+ = c_i - c + (x - y) / (K * lr). Stores c_i+ and returns delta c_i."""
        ci = self.ci.get(cid, torch.zeros_like(self.c))
        new = ci - self.c + (x - y) / (steps * lr)
        self.ci[cid] = new
        return new - ci

    def server_update(self, delta_cs: list[torch.Tensor], num_clients: int) -> None:
        """c <- c + (|S| / N) * mean_i(delta c_i)."""
        if delta_cs:
            self.c = self.c + torch.stack(delta_cs).mean(0) * (len(delta_cs) / num_clients)

    def state_dict(self) -> dict:
        return {"c": self.c.clone(), "ci": {int(k): v.clone() for k, v in self.ci.items()}}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "ScaffoldState":
        return cls(c=sd["c"].clone(), ci={int(k): v.clone() for k, v in sd["ci"].items()})
