"""Fixtures shared by test modules: ``procs`` (processes a Flower test starts, stopped by PID)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


class Procs:
    """Processes started by a test, stopped by PID (with their children) at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.homes: set[str] = set()

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        self.homes.add(env["FLWR_HOME"])
        return p

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop_all(self) -> list[int]:
        """Stop every started process tree; then anything still carrying one of our FLWR_HOMEs (by PID)."""
        from fedsafe.flower.sim import stop_env_marked, stop_tree

        for p in reversed(self.procs):
            stop_tree(p, grace_s=5)
        return [pid for h in sorted(self.homes) for pid in stop_env_marked(f"FLWR_HOME={h}")]


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        stray = ps.stop_all()
        leftover = [p.pid for p in ps.procs if p.poll() is None]
        assert not leftover, f"processes still running: {leftover}"
        if stray:
            print(f"stopped {len(stray)} stray process(es) outside the started trees: {stray}")
