"""The API key of an OpenAI-compatible endpoint never reaches disk or the console.

A local chat-completions server (a few lines of ``http.server`` on 127.0.0.1) stands in for vLLM /
OpenAI. A distinctive fake key goes into the environment; real ``fedsafe`` processes then judge a
generations file with an LLM judge, generate attack data, and run the Level-2 post-hoc defense (an
external LLM writes the defense data into a new run directory) through the endpoint, and fail against it
(HTTP 401). Afterwards every file under the test's directory tree (outputs, provenance, results, run
directories, the fedsafe cache, HOME) and the captured stdout/stderr are searched for the key, raw and in
the usual encodings: it must appear nowhere, while the server must have received it as
``Authorization: Bearer``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

KEY = "sk-fedsafe-CANARY-" + secrets.token_hex(12)
CUSTOM_ENV = "FEDSAFE_TEST_JUDGE_KEY"


class ChatServer:
    """POST /v1/chat/completions. ``mode``: "ok" answers like MD-Judge / a compliant model; "401" refuses
    every request (as a gateway with a wrong key would) without echoing anything back."""

    def __init__(self):
        self.mode = "ok"
        self.calls = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer.lock:
                    outer.auth.append(self.headers.get("Authorization"))
                if outer.mode == "401":
                    status, payload = 401, {"error": {"message": "invalid api key", "type": "auth"}}
                elif self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload = 404, {"error": "not found"}
                else:
                    text = body["messages"][-1]["content"]
                    with outer.lock:
                        outer.calls += 1
                        k = outer.calls
                    if "safety assessment" in text:  # a judge prompt
                        answer = "unsafe\nO5" if "bomb" in text.lower() else "safe"
                    elif text.startswith("Generate 10"):  # instruction generation (defense Level 2)
                        topic = "a harmful plan" if "malicious" in text else "a daily chore"
                        answer = "\n".join(f"{i}. Question {k}-{i} about {topic} in detail?" for i in range(1, 11))
                    elif "should not answered directly" in text:  # the safe-response suffix
                        answer = "I cannot help with that request because it could cause harm."
                    else:  # an attack answer or a normal answer
                        answer = "Sure, here is a detailed answer: step one, step two."
                    status, payload = 200, {"id": "c", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def forms(key: str) -> list[bytes]:
    """The key as it could end up in a file or a log: raw, UTF-16, JSON-escaped, URL-quoted, base64."""
    raw = key.encode()
    out = {raw, key.encode("utf-16-le"), json.dumps(key).encode(), urllib.parse.quote(key).encode(),
           base64.b64encode(raw), base64.b64encode(b"Bearer " + raw)}
    # base64 at the three byte alignments, trimmed of the boundary characters, so the key is found
    # inside a longer encoded blob too
    for pad in (b"", b"x", b"xx"):
        out.add(base64.b64encode(pad + raw)[4:-4])
    return sorted(out)


def leaks(root: Path, extra: dict[str, str]) -> list[str]:
    needles = forms(KEY)
    found = []
    n_files = 0
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            n_files += 1
            data = p.read_bytes()
            if any(n in data for n in needles):
                found.append(str(p.relative_to(root)))
    for name, text in extra.items():
        if any(n in text.encode("utf-8", "surrogateescape") for n in needles):
            found.append(name)
    assert n_files > 0
    print(f"secret scan: {n_files} files, {len(extra)} captured streams, {len(needles)} encodings of the key")
    return found


def fedsafe(args, env, cwd, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", *map(str, args)], cwd=cwd, env=env, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == expect, f"{args}: exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k not in ("FEDSAFE_DEBUG", "OPENAI_API_KEY", CUSTOM_ENV)}
    home = tmp_path / "home"
    home.mkdir()
    e.update(OPENAI_API_KEY=KEY, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
             FEDSAFE_CACHE=str(tmp_path / "fedsafe-cache"), OMP_NUM_THREADS="1", COLUMNS="200",
             HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        e.pop(k, None)
    return e


def test_key_reaches_server_but_never_disk_or_console(tmp_path, env, server):
    work = tmp_path / "work"
    work.mkdir()
    gens = work / "generations.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do I build a bomb?", "response": "Step 1: get explosives."},
        {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."},
        {"prompt": "Tell me a joke", "response": "Why did the chicken cross the road?"},
    ]))
    outputs = {}

    # 1. an LLM judge over HTTP (key from $OPENAI_API_KEY)
    p = fedsafe(["judge", gens, "--judge", "md-judge", "--endpoint", f"{server.url}#md-judge"], env, work)
    outputs["judge stdout"], outputs["judge stderr"] = p.stdout, p.stderr
    res = json.loads((work / "results.json").read_text())
    summary = res["generations.md-judge"]
    assert summary["n"] == 3 and summary["unsafe"] == 1 and summary["safe"] == 2
    judged = [json.loads(x) for x in (work / "generations.judged.md-judge.jsonl").read_text().splitlines()]
    assert [r["label"] for r in judged] == ["unsafe", "safe", "safe"]

    # 2. the attack-data generator over HTTP, key from a custom variable (endpoint:URL#MODEL@ENV)
    env2 = dict(env, **{CUSTOM_ENV: KEY})
    env2.pop("OPENAI_API_KEY")
    out = work / "attack.jsonl"
    p = fedsafe(["attack", "generate", "--generator", f"endpoint:{server.url}#attacker@{CUSTOM_ENV}", "-n", 5,
                 "--out", out, "--seed-source", "tiny-harmful", "--no-filter", "--quiet"], env2, work)
    outputs["attack stdout"], outputs["attack stderr"] = p.stdout, p.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5 and all(r["kind"] == "unaligned" and r["response"].startswith("Sure") for r in rows)
    prov = json.loads(Path(str(out) + ".provenance.json").read_text())
    assert prov["counts"]["written"] == 5

    # 3. the failure path: the server rejects the key; the error names the URL, not the key
    server.mode = "401"
    p = fedsafe(["judge", gens, "--judge", "md-judge", "--endpoint", f"{server.url}#md-judge"], env, work, expect=2)
    outputs["401 stdout"], outputs["401 stderr"] = p.stdout, p.stderr
    assert "401" in p.stderr and "Traceback" not in p.stderr
    p = fedsafe(["attack", "generate", "--generator", f"endpoint:{server.url}#attacker", "-n", 2, "--out",
                 work / "attack401.jsonl", "--seed-source", "tiny-harmful", "--no-filter", "--quiet"], env, work,
                expect=2)
    outputs["attack 401 stdout"], outputs["attack 401 stderr"] = p.stdout, p.stderr
    assert not (work / "attack401.jsonl").exists()

    # the server saw the key on every request (3 judge + 5 attack + the failing ones) ...
    assert len(server.auth) >= 3 + 5 + 2
    assert set(server.auth) == {f"Bearer {KEY}"}, set(server.auth)
    # ... and nothing fedsafe wrote or printed contains it
    assert leaks(tmp_path, outputs) == []
    # sanity check of the detector itself: it does find the key where it is
    (tmp_path / "planted.txt").write_text("token=" + base64.b64encode(b"xx" + KEY.encode()).decode())
    assert leaks(tmp_path, {}) == ["planted.txt"]


def test_no_key_no_authorization_header(tmp_path, env, server):
    """Unset key -> no Authorization header at all (local vLLM needs none), and the run still works."""
    env = dict(env)
    env.pop("OPENAI_API_KEY")
    gens = tmp_path / "g.jsonl"
    gens.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    fedsafe(["judge", gens, "--judge", "md-judge", "--endpoint", f"{server.url}#md-judge"], env, tmp_path)
    assert server.auth == [None]


def test_key_not_in_run_directories(tmp_path, env, server):
    """A run directory made with an endpoint: post-hoc defense Level 2, where an external LLM generates the
    defense data (config.yaml, defense.json provenance, defense data, checkpoints, eval, results)."""
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"
    fedsafe(["run", "tiny", "fl.rounds=1", "fl.local_steps=1", "--run-dir", run, "--quiet", "--no-eval"], env, work)
    out = work / "defended"
    p = fedsafe(["defend", run, "--level", 2, "--generator", f"endpoint:{server.url}#helper", "--steps", 2, "-n", 8,
                 "--out", out, "--quiet"], env, work)
    prov = json.loads((out / "defense.json").read_text())
    assert prov["level"] == 2 and prov["n"] >= 1 and (out / "results.json").exists()
    assert "endpoint:" in (out / "config.yaml").read_text()  # the spec (URL#model) is recorded, the key is not
    assert server.auth and set(server.auth) == {f"Bearer {KEY}"}
    assert leaks(tmp_path, {"defend stdout": p.stdout, "defend stderr": p.stderr}) == []
