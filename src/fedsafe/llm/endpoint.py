"""Client for OpenAI-compatible ``POST {base_url}/chat/completions`` servers.

Used both to generate attack data (the paper prompts Mistral-7B-Instruct for MaliciousGen, App. C.2) and
to query LLM judges (MD-Judge served by vLLM, GPT-4 for MT-Bench). Standard library only (``urllib`` +
``concurrent.futures``) so the core install needs no HTTP or OpenAI SDK dependency.

Security: the API key is read from the environment variable named by ``api_key_env`` at request time.
It is never stored on the config or the generator, so it cannot leak through ``to_dict()``, ``repr`` or
error messages.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError, FedsafeError
from .base import ProgressBar, Prompt, check_sampling, to_messages

# Statuses worth retrying: rate limiting and server-side failures (vLLM returns 503 while loading).
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class EndpointConfig:
    """Where and how to call a chat-completions server.

    Parameters
    ----------
    base_url : str
        e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended unless already present.
    model : str
        the ``model`` field of the request (the served model name).
    api_key_env : str or None, default "OPENAI_API_KEY"
        name of the environment variable holding the key; unset/empty -> no Authorization header
        (local vLLM needs none). ``None`` disables auth entirely.
    timeout : float, default 60
        seconds per HTTP attempt (connect + read).
    max_retries : int, default 3
        extra attempts after a 429/5xx, connection error or timeout (so up to 4 attempts).
    concurrency : int, default 4
        parallel requests (thread pool).
    backoff : float, default 1.0
        first retry delay in seconds; doubles each retry (with jitter), capped at ``max_backoff``.
        A numeric ``Retry-After`` header from the server takes precedence.
    max_backoff : float, default 30
    max_tokens_field : str, default "max_tokens"
        newer OpenAI reasoning models want ``max_completion_tokens`` instead.
    extra_body : dict
        merged into every request body (e.g. ``{"top_k": -1}`` for vLLM, ``{"stop": [...]}``).
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    concurrency: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_tokens_field: str = "max_tokens"
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("endpoint model name is empty")
        if self.timeout <= 0:
            raise ConfigError(f"endpoint timeout must be > 0, got {self.timeout}")
        if self.max_retries < 0:
            raise ConfigError(f"endpoint max_retries must be >= 0, got {self.max_retries}")
        if self.concurrency < 1:
            raise ConfigError(f"endpoint concurrency must be >= 1, got {self.concurrency}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("endpoint backoff values must be >= 0")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def to_dict(self) -> dict[str, Any]:
        """Serialisable settings for run records. Holds the env-var *name* only, never the key."""
        return asdict(self)


class EndpointGenerator:
    """:class:`~fedsafe.llm.base.Generator` backed by an OpenAI-compatible server.

    Requests are independent (one prompt each, ``n=1``) and run on a thread pool of
    ``cfg.concurrency`` workers; results come back in input order. The first request that still fails
    after its retries aborts the batch with a :class:`~fedsafe.errors.FedsafeError` naming the URL.
    """

    def __init__(self, cfg: EndpointConfig, *, progress: bool = False):
        self.cfg = cfg
        self.progress = progress

    def __repr__(self) -> str:
        return f"EndpointGenerator(url={self.cfg.url!r}, model={self.cfg.model!r})"

    # -- public -----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
    ) -> list[str]:
        check_sampling(max_new_tokens, temperature, top_p)
        bodies = []
        for p in prompts:
            body: dict[str, Any] = {
                "model": self.cfg.model,
                "messages": to_messages(p, system),
                self.cfg.max_tokens_field: int(max_new_tokens),
                "temperature": float(temperature),
                "top_p": float(top_p),
                "n": 1,
            }
            if seed is not None:
                body["seed"] = int(seed)
            body.update(self.cfg.extra_body)
            bodies.append(body)
        if not bodies:
            return []
        return self._run_all(bodies)

    # -- internals --------------------------------------------------------------------------------
    def _run_all(self, bodies: list[dict]) -> list[str]:
        lock = threading.Lock()
        bar = ProgressBar(len(bodies), f"querying {self.cfg.model}", enabled=self.progress)

        def one(body: dict) -> str:
            out = self._request(body)
            with lock:
                bar.advance(1)
            return out

        workers = min(self.cfg.concurrency, len(bodies))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedsafe-endpoint")
        try:
            with bar:
                return list(pool.map(one, bodies))
        finally:
            # On failure do not start queued requests: they would only hit the same broken server.
            pool.shutdown(wait=True, cancel_futures=True)

    def _request(self, body: dict) -> str:
        cfg, url = self.cfg, self.cfg.url
        data = json.dumps(body).encode("utf-8")
        last_problem = ""
        for attempt in range(cfg.max_retries + 1):
            req = urllib.request.Request(url, data=data, method="POST", headers=self._headers())
            retry_after: float | None = None
            try:
                with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                    raw = resp.read()
                return self._parse(raw)
            except urllib.error.HTTPError as e:
                detail = _body_excerpt(e)
                if e.code not in _RETRY_STATUS:
                    raise FedsafeError(f"endpoint {url} returned HTTP {e.code} {e.reason}: {detail}") from None
                last_problem = f"HTTP {e.code} {e.reason}: {detail}"
                retry_after = _retry_after(e)
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_problem = f"timed out after {cfg.timeout:g}s"
                else:
                    last_problem = f"unreachable ({reason})"
            except (TimeoutError, socket.timeout):
                # A read timeout surfaces directly, not wrapped in URLError.
                last_problem = f"timed out after {cfg.timeout:g}s"
            except (ConnectionError, http.client.HTTPException) as e:
                # Reset / remote-disconnect mid-response, or a garbled status line.
                last_problem = f"connection failed ({type(e).__name__}: {e})"
            if attempt < cfg.max_retries:
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                time.sleep(delay)
        n = cfg.max_retries + 1
        raise FedsafeError(f"endpoint {url}: {last_problem} (gave up after {n} attempt{'s' * (n > 1)})")

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "fedsafe"}
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _backoff(self, attempt: int) -> float:
        # Exponential with +-25% jitter so concurrent workers do not retry in lockstep.
        base = min(self.cfg.backoff * (2**attempt), self.cfg.max_backoff)
        return base * random.uniform(0.75, 1.25)

    def _parse(self, raw: bytes) -> str:
        url = self.cfg.url
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FedsafeError(f"endpoint {url} returned malformed JSON ({e}): {raw[:200]!r}") from None
        try:
            choice = obj["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise FedsafeError(
                f"endpoint {url} returned JSON without choices[0].message (not a chat-completions response): "
                f"{json.dumps(obj)[:200]}"
            ) from None
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is None:
            # OpenAI puts model-side refusals in a separate "refusal" field with content=null.
            content = msg.get("refusal") if isinstance(msg, dict) else None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise FedsafeError(f"endpoint {url} returned non-string message content: {content!r:.200}")
        return content


def _body_excerpt(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", "replace")
    except Exception:  # the body is only diagnostic
        return ""
    return " ".join(text.split())[:300]


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return max(0.0, min(float(value), 120.0)) if value is not None else None
    except ValueError:  # an HTTP-date; fall back to our own backoff
        return None
