"""``fedsafe flower sim CONFIG`` (Flower Simulation Engine) and ``fedsafe flower deploy-info``.

:func:`run_flower_sim` runs a fedsafe federation on Flower's Simulation Engine the way Flower 1.42
supports it (``flwr run``; ``flwr.simulation.run_simulation`` is deprecated and ignores the app's run
config): it writes the Flower app (``pyproject.toml``, see :data:`fedsafe.flower.APP_PYPROJECT`) into
a private work directory with its own ``FLWR_HOME``, starts ``flower-superlink --simulation`` on a free
127.0.0.1 port, runs ``flwr run APP fedsafe-sim --stream`` with ``num_supernodes`` = the number of
fedsafe clients (Flower gives node i ``partition-id=i``), and stops the SuperLink and its children by
PID afterwards. Telemetry, update checks, runtime dependency installation and Ray usage stats are off.

This module imports ``flwr`` only inside functions, so ``fedsafe --help`` works without Flower.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import FedsafeError
from . import APP_PYPROJECT, OFFLINE_ENV, check_supported, join_overrides, offline_env

app = typer.Typer(help="Run fedsafe on Flower (the optional `flower` extra of fedsafe).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

CONNECTION = "fedsafe-sim"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------------------------- helpers
def require_flower(simulation: bool = False) -> None:
    if importlib.util.find_spec("flwr") is None:
        raise FedsafeError("Flower is not installed: pip install \"fedsafe[flower]\"")
    if simulation and importlib.util.find_spec("ray") is None:
        raise FedsafeError("Flower's Simulation Engine needs Ray: pip install \"flwr[simulation]\"")


def flower_bin(name: str) -> str:
    """Path of a Flower executable (``flwr``, ``flower-superlink``, ...), preferring this interpreter's."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FedsafeError(f"`{name}` not found; install Flower in this environment: pip install \"fedsafe[flower]\"")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(dest: str | Path) -> Path:
    """Write the fedsafe Flower app (its ``pyproject.toml``) into ``dest``; returns ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    return dest


def toml_str(s: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    import json

    return json.dumps(str(s), ensure_ascii=False)


def descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (Linux /proc), children first in breadth order."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def stop_tree(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Stop ``proc`` and every process it started, by PID: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc is None or proc.poll() is not None:  # already exited and reaped: its PID may be reused, leave it
        return
    pids = descendants(proc.pid) if os.path.isdir("/proc") else []
    for p in [proc.pid, *pids]:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for p in [proc.pid, *pids]:
        while _alive(p) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def processes_with_env(marker: str) -> list[int]:
    """PIDs of live processes whose environment contains ``marker`` (e.g. a private ``FLWR_HOME=...``):
    everything a launcher started, including processes that were re-parented (Ray daemons)."""
    out, me, needle = [], os.getpid(), marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and _alive(int(entry)):
            out.append(int(entry))
    return out


def stop_env_marked(marker: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every live process whose environment contains ``marker``; returns their PIDs."""
    pids = processes_with_env(marker)
    if pids and os.environ.get("FEDSAFE_DEBUG"):
        for p in pids:
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:160]
            except OSError:
                cmd = "?"
            print(f"fedsafe: leftover process {p}: {cmd}", file=sys.stderr)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def wait_http_ok(url: str, proc: subprocess.Popen, timeout_s: float, log_file: Path | None = None) -> None:
    """Wait until ``url`` (on 127.0.0.1) answers 2xx, or fail when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedsafeError(f"`{proc.args[0]}` exited with code {proc.returncode}" + _tail(log_file))
        try:
            with _NO_PROXY.open(url, timeout=2) as r:  # loopback only, never via a proxy
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise FedsafeError(f"{url} did not come up within {timeout_s:.0f} s" + _tail(log_file))


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    return "\n--- " + str(path) + " (last lines) ---\n" + "\n".join(lines)


# --------------------------------------------------------------------------------------------- simulation
def run_flower_sim(config: str | None, overrides: list[str] | None = None, run_dir: str | Path | None = None,
                   progress: bool = True, *, evaluate: bool = True, client_cpus: float = 1.0,
                   federation_config: list[str] | None = None, node_wait_s: float = 120.0,
                   timeout_s: float | None = None, keep_workdir: bool = False, overwrite: bool = False,
                   resume: bool = False) -> Path:
    """Run a fedsafe federation on Flower's Simulation Engine; returns the run directory.

    ``config`` is a preset name or YAML path, ``overrides`` ``key=value`` items (as ``fedsafe run``).
    One simulated SuperNode per fedsafe client (``partition-id`` = client id), ``client_cpus`` CPUs per
    Ray actor. ``federation_config`` adds ``flwr run --federation-config`` items (e.g.
    ``init_args_num_cpus=2``). The run directory matches ``fedsafe run``'s (plus ``flower.json`` and the
    streamed Flower log ``flower_sim.log``).

    With ``resume`` ``run_dir`` is an interrupted simulation, continued from its last complete round;
    ``config`` may then be None (the run's own ``config.yaml``). Refused, before anything starts, when
    the config, the simulated federation or the Flower version differ from the run's.
    """
    from ..config import load_config
    from ..rundir import move_aside, new_run_dir, put_back

    require_flower(simulation=True)
    aside = None
    overrides = list(overrides or [])
    if resume and run_dir is None:
        raise FedsafeError("--resume needs the run directory to continue")
    if resume and not Path(run_dir).is_dir():
        raise FedsafeError(f"cannot resume {run_dir}: no such run directory")
    if resume and config is None:
        config = str(Path(run_dir) / "config.yaml")
        if not Path(config).is_file():
            raise FedsafeError(f"cannot resume {run_dir}: not a run directory (no config.yaml)")
    if config is None:
        raise FedsafeError("give a CONFIG (preset name or YAML path), e.g. `fedsafe flower sim tiny`")
    source = str(Path(config).resolve()) if Path(config).is_file() else str(config)
    cfg = load_config(source, overrides)
    check_supported(cfg)
    federation = " ".join(["simulation", f"num_supernodes={cfg.num_clients}", *(federation_config or [])])
    if resume:
        import flwr

        from .resume import check_resume

        d = Path(run_dir).resolve()
        check_resume(d, cfg, {"flwr_version": str(flwr.__version__), "federation": federation})
    os.environ.update(OFFLINE_ENV)  # this process and everything it starts stay offline
    work = Path(tempfile.mkdtemp(prefix="fedsafe-flower-sim-"))
    home = work / "flwr-home"
    home.mkdir()
    env = offline_env(FLWR_HOME=str(home))
    app_dir = write_app(work / "app")
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    fed_cfg = [f"num_supernodes={cfg.num_clients}", f"client_resources_num_cpus={client_cpus:g}",
               "client_resources_num_gpus=0", *(federation_config or [])]
    link_log = work / "superlink.log"
    sim_log = work / "flower_sim.log"  # copied into the run directory at the end (it must be empty now)
    link = runner = None
    timed_out: list[bool] = []
    t0 = time.time()
    if not resume:
        # --overwrite keeps the old run beside the new directory until Flower has started the new run
        # (its server app wrote flower.json): a simulation that never starts gives the old one back.
        aside = move_aside(Path(run_dir)) if overwrite and run_dir is not None else None
        try:
            d = new_run_dir(cfg, run_dir, overwrite).resolve()  # as rundir.set_up_run_dir does
        except BaseException:
            put_back(aside, Path(run_dir))
            shutil.rmtree(work, ignore_errors=True)
            raise
    try:
        run_cfg = work / "run_config.toml"
        run_cfg.write_text(
            f"fedsafe-config = {toml_str(source)}\noverrides = {toml_str(join_overrides(overrides))}\n"
            f"run-dir = {toml_str(str(d))}\nevaluate = {'true' if evaluate else 'false'}\n"
            f"node-wait-s = {int(node_wait_s)}\nresume = {'true' if resume else 'false'}\n"
            f"federation = {toml_str(federation)}\n", encoding="utf-8")
        with open(link_log, "wb") as lf:
            link = subprocess.Popen(
                [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                 "--database", str(work / "state.db")],
                cwd=work, env=env, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        wait_http_ok(f"http://127.0.0.1:{port}/health", link, 60, link_log)
        cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(run_cfg),
               "--federation-config", " ".join(fed_cfg)]
        with open(sim_log, "w", encoding="utf-8") as out:
            runner = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True, bufsize=1)
            assert runner.stdout is not None
            timer = None
            if timeout_s is not None:  # a silent hang must not outlive the timeout either
                timer = threading.Timer(timeout_s, lambda: (timed_out.append(True), stop_tree(runner, grace_s=5),
                                                            stop_tree(link)))
                timer.daemon = True
                timer.start()
            try:
                for line in runner.stdout:
                    out.write(line)
                    if progress:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                runner.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        if timed_out:
            raise FedsafeError(f"the Flower simulation did not finish within {timeout_s:.0f} s" + _tail(sim_log))
    finally:
        stop_tree(runner, grace_s=5)
        stop_tree(link)
        # Ray actors outlive the simulation re-parented away from the SuperLink: find them by our private
        # FLWR_HOME in their environment (FEDSAFE_DEBUG=1 lists them)
        stop_env_marked(f"FLWR_HOME={home}")
        if aside is not None:
            if _flower_status(d) is None:  # the new run never started: the old one is the run to keep
                put_back(aside, d)
                sim_log.unlink(missing_ok=True)  # its tail is in the error already; keep the old run's log
            else:
                shutil.rmtree(aside, ignore_errors=True)
        if sim_log.exists() and d.is_dir():  # a resumed simulation adds its log to the interrupted one's
            with open(sim_log, "rb") as src, open(d / "flower_sim.log", "ab" if resume else "wb") as dst:
                shutil.copyfileobj(src, dst)
        if not keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
    status = _flower_status(d)
    if status != "finished":
        raise FedsafeError(f"the Flower simulation did not finish (status: {status or 'no flower.json'}; "
                           f"flwr run exited with {runner.returncode if runner else '?'})"
                           + _tail(d / "flower_sim.log"))
    rejected = _rejected_count(d)
    if rejected:
        print(f"fedsafe: warning: {rejected} client update(s) were rejected; see rejected in {d / 'metrics.jsonl'} "
              f"and {d / 'flower.json'}", file=sys.stderr)
    if progress:
        print(f"fedsafe: Flower simulation finished in {time.time() - t0:.1f} s: {d}")
    return d


def _rejected_count(d: Path) -> int:
    import json

    try:
        info = json.loads((d / "flower.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(r.get("rejected", {})) for r in info.get("rounds", [])) + len(info.get("node_problems", {}))


def _flower_status(d: Path) -> str | None:
    import json

    p = d / "flower.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text()).get("status")
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------- CLI
def _split(args: list[str] | None) -> tuple[str | None, list[str]]:
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.command("sim")
def sim_cmd(
    args: Optional[List[str]] = typer.Argument(None, help="CONFIG (preset name or YAML path), then key=value overrides, e.g. `tiny fl.rounds=2`."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write into this directory (default: OUTPUT_DIR/NAME-TIMESTAMP)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow --run-dir to replace an existing non-empty directory."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the final safety/helpfulness evaluation."),
    client_cpus: float = typer.Option(1.0, "--client-cpus", help="CPUs per simulated client (Ray actor)."),
    federation_config: Optional[List[str]] = typer.Option(None, "--federation-config", help="Extra `flwr run --federation-config` item, e.g. init_args_num_cpus=2 (repeatable)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds."),
    keep_workdir: bool = typer.Option(False, "--keep-workdir", help="Keep the temporary FLWR_HOME / SuperLink log."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream Flower's log."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this interrupted simulation from its last complete round (CONFIG optional; it must match)."),
):
    """Run a federation on Flower's Simulation Engine (one simulated SuperNode per client); prints the run directory."""
    source, overrides = _split(args)
    if source is None and resume is None:
        raise FedsafeError("give a CONFIG (preset name or YAML path), e.g. `fedsafe flower sim tiny`")
    if resume is not None:
        if run_dir is not None and Path(run_dir).resolve() != resume.resolve():
            raise FedsafeError("--resume RUN_DIR already names the run directory; drop --run-dir")
        if overwrite:
            raise FedsafeError("--resume and --overwrite exclude each other")
        run_dir = resume
    d = run_flower_sim(source, overrides, run_dir, progress=not quiet, evaluate=not no_eval, client_cpus=client_cpus,
                       federation_config=federation_config, timeout_s=timeout, keep_workdir=keep_workdir,
                       overwrite=overwrite, resume=resume is not None)
    typer.echo(str(d))


@app.command("deploy-info")
def deploy_info_cmd(
    args: Optional[List[str]] = typer.Argument(None, help="CONFIG then optional key=value overrides (default: tiny)."),
    superlink: str = typer.Option("127.0.0.1:9100", "--superlink", help="HOST:PORT of the SuperLink as the SuperNodes and flwr reach it."),
    connection: str = typer.Option("fedsafe", "--connection", help="Name of the [superlink.NAME] entry in $FLWR_HOME/config.toml."),
    certs: str = typer.Option("certs", "--certs", help="Directory written by scripts/make_certs.sh."),
    write_app_dir: Optional[Path] = typer.Option(None, "--write-app", help="Also write the Flower app (pyproject.toml) into this directory."),
):
    """Print what to start where for a deployment of CONFIG: one SuperNode per client, with its node config."""
    from ..config import load_config
    from ..data.partition import build_federation

    source, overrides = _split(args)
    source = source or "tiny"
    cfg = load_config(source, overrides)
    check_supported(cfg)
    fed = build_federation(cfg.data, seed=cfg.seed)
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise FedsafeError(f"--superlink must be HOST:PORT, got {superlink!r}")
    bind = host if host in ("127.0.0.1", "localhost", "::1") else "0.0.0.0"
    mal = set(fed.malicious_ids)
    k = cfg.num_clients
    lines = [f"# fedsafe on Flower: {cfg.name}, {k} clients, {cfg.fl.sample_clients} per round, {cfg.fl.rounds} "
             f"rounds, aggregator {cfg.fl.aggregator}, server {cfg.fl.fed_alg}",
             "# every machine: pip install \"fedsafe[flower]\", then",
             "export " + " ".join(f"{k_}={v}" for k_, v in OFFLINE_ENV.items()), "",
             f"# certificates (SuperLink operator): scripts/make_certs.sh {certs} {k} {host}",
             "# SuperLink (server organisation); the ServerApp writes the run directory on this machine",
             f"flower-superlink --host {bind} --port {port} --ssl-ca-certfile {certs}/ca.crt "
             f"--ssl-certfile {certs}/server.pem --ssl-keyfile {certs}/server.key --enable-supernode-auth "
             "--disable-runtime-dependency-installation --database state.db", "",
             "# operator's $FLWR_HOME/config.toml",
             f"#   [superlink.{connection}]", f"#   address = \"{superlink}\"",
             f"#   root-certificates = \"/abs/path/{certs}/ca.crt\""]
    for c in fed.clients:
        kind = "malicious" if c.id in mal else "benign"
        lines += ["", f"# organisation {c.id}: {kind} in this config, {len(c.records)} training records",
                  f"flwr supernode register {certs}/supernode-{c.id}.pub {connection}",
                  f"flower-supernode --superlink {superlink} --root-certificates {certs}/ca.crt "
                  f"--auth-supernode-private-key {certs}/supernode-{c.id} "
                  f"--node-config \"partition-id={c.id} num-partitions={k}\""]
    src = source if not Path(source).is_file() else str(Path(source).resolve())
    ov = join_overrides(overrides).replace("'", "")
    lines += ["", "# operator: start the run (streams the ServerApp log)",
              f"flwr run flower-app {connection} --stream --run-config \"fedsafe-config='{src}' overrides='{ov}' "
              "run-dir='/abs/path/on/superlink/run'\""]
    if write_app_dir is not None:
        write_app(write_app_dir)
        lines.append(f"# wrote the Flower app to {write_app_dir}/pyproject.toml")
    typer.echo("\n".join(lines))


if __name__ == "__main__":  # python -m fedsafe.flower.sim sim tiny fl.rounds=2
    try:
        app()
    except FedsafeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
