"""Run fedsafe federations on Flower (https://flower.ai, flwr >= 1.20; tested with 1.42).

This subpackage is the optional Flower engine (``pip install fedsafe[flower]``); the core never imports
it, and importing ``fedsafe.flower`` itself does not import ``flwr`` (only the app modules do).

* :mod:`fedsafe.flower.client_app` -- the ``ClientApp``: a SuperNode holds one fedsafe client (its
  ``partition-id`` node config), trains the LoRA adapter on that client's data with exactly the
  in-process :meth:`fedsafe.fl.engine.Engine.client_update` (benign or malicious as the fedsafe
  config's data groups say, same seeds) and replies with the adapter as an ``ArrayRecord``.
* :mod:`fedsafe.flower.strategy` -- ``FedsafeStrategy``, a ``flwr.serverapp.strategy.FedAvg`` subclass
  that samples the clients the in-process engine would sample, validates every reply, and aggregates
  with fedsafe's robust rules and server optimiser by running the engine's own round code, so a Flower
  run writes the same run directory and reaches the same global adapter as ``fedsafe run``.
* :mod:`fedsafe.flower.server_app` -- the ``ServerApp`` (run directory, evaluation, post-hoc defense).
* :mod:`fedsafe.flower.resume` -- what a resumed Flower run must match (config, federation, Flower
  version); the round checkpoints are the engine's own.
* :mod:`fedsafe.flower.sim` -- ``fedsafe flower sim CONFIG`` on Flower's Simulation Engine and
  ``fedsafe flower deploy-info`` (what to start where for a real deployment).

The federated instruction tuning (FedIT) setting, the data-only attack and the post-hoc defense are
those of Ye et al., "Emerging Safety Attack and Defense in Federated Instruction Tuning of Large
Language Models", ICLR 2025. Flower's Message API and runtimes are described in Beutel et al.,
"Flower: A Friendly Federated Learning Research Framework" (arXiv:2007.14390) and the Flower docs.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # importing fedsafe.flower stays light: `fedsafe --help` reaches it
    from ..config import RunConfig

#: Environment variables that keep Flower and Ray from contacting the internet (telemetry, update
#: check, runtime ``uv sync`` of app dependencies, Ray usage stats).
OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

#: Server algorithms the Flower engine supports (all of fedsafe's: FedProx's proximal term uses the
#: global adapter the client receives; SCAFFOLD's correction ``c - c_i`` is computed by the server and
#: sent with the global adapter).
SUPPORTED_FED_ALGS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold")

#: Keys of ``[tool.flwr.app.config]`` (``context.run_config``) and their defaults.
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "fedsafe-config": "tiny",  # preset name or absolute YAML path (same on every machine)
    "overrides": "",  # key=value overrides, whitespace separated, shell quoting (shlex)
    "run-dir": "",  # where the ServerApp writes the run directory ("" = OUTPUT_DIR/NAME-TIMESTAMP)
    "evaluate": True,  # evaluate the final adapter (results.json) like `fedsafe run`
    "node-wait-s": 120,  # how long the server waits for every partition-id to connect
    "round-timeout-s": 3600,  # how long the server waits for the replies of one round
    "resume": False,  # continue the run directory `run-dir` from its last complete round
    "federation": "",  # label of the federation (a resume must name the same); "" = deployment
}

APP_PYPROJECT = """\
# A Flower app (FAB) for fedsafe: `flwr run <this directory> <superlink-connection>`.
# The app code is the installed `fedsafe` package (pip install "fedsafe[flower]") on the SuperLink host
# and on every SuperNode; this directory only carries the configuration. Keep `dependencies = []`:
# SuperLink would otherwise `uv sync` them at run time (network; see docs/running-across-machines.md).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsafe-flower"
version = "0.1.0"
description = "Federated instruction tuning with LoRA, safety attack and defense (fedsafe) on Flower"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsafe"

[tool.flwr.app.components]
serverapp = "fedsafe.flower.server_app:app"
clientapp = "fedsafe.flower.client_app:app"

[tool.flwr.app.config]
# fedsafe preset name or an absolute path to a YAML config that exists on every machine
fedsafe-config = "tiny"
# fedsafe key=value overrides, space separated (shell quoting), e.g. "fl.rounds=2 fl.aggregator=median"
overrides = ""
# run directory the ServerApp writes (absolute path on the ServerApp's machine; "" = runs/NAME-TIMESTAMP)
run-dir = ""
# evaluate the final adapter after the last round (results.json), as `fedsafe run` does
evaluate = true
# seconds the server waits for a SuperNode per partition-id before starting without the missing ones
node-wait-s = 120
# seconds the server waits for the replies of one round
round-timeout-s = 3600
# continue the run directory `run-dir` from its last complete round (same config, federation, Flower version)
resume = false
# a label for the federation this run belongs to; a resume must name the same one ("" = deployment)
federation = ""
"""


def offline_env(env: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with :data:`OFFLINE_ENV` and ``extra`` set."""
    out = dict(os.environ if env is None else env)
    out.update(OFFLINE_ENV)
    for key in ("NO_PROXY", "no_proxy"):  # loopback traffic must never go through an HTTP(S) proxy
        have = [h for h in out.get(key, "").split(",") if h.strip()]
        out[key] = ",".join(have + [h for h in ("127.0.0.1", "localhost", "::1") if h not in have])
    out.update(extra)
    return out


def parse_overrides(text: str | list | tuple | None) -> list[str]:
    """``"fl.rounds=2 'data.groups=[...]'"`` -> ``["fl.rounds=2", "data.groups=[...]"]`` (shlex)."""
    if not text:
        return []
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return shlex.split(str(text))


def join_overrides(overrides: list[str] | tuple[str, ...] | None) -> str:
    return shlex.join(list(overrides or []))


def run_config_value(run_config: Mapping[str, Any], key: str) -> Any:
    return run_config.get(key, RUN_CONFIG_DEFAULTS[key])


def load_run_cfg(run_config: Mapping[str, Any]):
    """The fedsafe :class:`~fedsafe.config.RunConfig` named by a Flower run config."""
    from ..config import load_config

    source = str(run_config_value(run_config, "fedsafe-config") or "tiny")
    overrides = parse_overrides(run_config_value(run_config, "overrides"))
    return load_config(source, overrides)


def check_supported(cfg: RunConfig) -> None:
    """Raise :class:`~fedsafe.errors.FedsafeError` for settings the Flower engine cannot reproduce."""
    from ..errors import FedsafeError

    if cfg.fl.fed_alg not in SUPPORTED_FED_ALGS:
        raise FedsafeError(f"fl.fed_alg={cfg.fl.fed_alg!r} is not supported on Flower; use one of "
                           + ", ".join(SUPPORTED_FED_ALGS))
    if not cfg.fl.reset_optimizer:
        raise FedsafeError("fl.reset_optimizer=false is not supported on Flower: each client's AdamW state would "
                           "live in whichever process trained it last; use the paper's default (true) or `fedsafe run`")


def as_bool(value: Any) -> bool:
    """A run-config flag: TOML booleans, or the strings true/false/yes/no/1/0."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "yes", "1", "on"):
            return True
        if v in ("false", "no", "0", "off", ""):
            return False
        from ..errors import FedsafeError

        raise FedsafeError(f"expected true or false, got {value!r}")
    return bool(value)
