"""A client for any OpenAI-compatible chat-completions endpoint, standard library only.

One call, :meth:`ChatClient.complete`, sends one user message and returns the reply's text and
token usage. Rate limits (429), server errors (5xx), timeouts and dropped connections are retried
with exponential backoff (a server's ``Retry-After`` wins when given); a 401 / 403 / 404 means the
endpoint, model or key is wrong and stops the run (:class:`EndpointRefused`); any other 4xx fails
that request only. Every HTTP attempt counts against the request budget. The API key travels in
the ``Authorization`` header only: it is in no message, log line or file.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import urllib.error
import urllib.request
from typing import Any, NoReturn

# Statuses that say "this endpoint / model / key is wrong": no retry, no point going on.
FATAL_STATUSES = (401, 403, 404)


class EndpointRefused(RuntimeError):
    """The endpoint refused the request in a way no retry fixes (wrong URL, model or key)."""


class RequestFailed(RuntimeError):
    """A request that still failed after its retries (or a 4xx); ``reason`` is a short tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Stopped(RuntimeError):
    """The run is stopping: its request budget (``max_requests``) is spent, or a stop was asked
    for. The request was not (or not completely) made; its example stays to do."""


@dataclasses.dataclass
class ClientStats:
    """Counts over the client's life; updated under a lock from the worker threads."""

    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    http_429: int = 0
    http_5xx: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    bad_responses: int = 0  # 200 with a body that is not a chat completion
    failed_requests: int = 0  # gave up on after retries (or a non-retryable 4xx)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def chat_url(endpoint: str) -> str:
    """``.../v1`` -> ``.../v1/chat/completions``; a URL that already names the route is kept."""
    endpoint = endpoint.rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint must be an http(s) URL, got {endpoint!r}")
    return endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retry_after = reason, detail, retry_after


class ChatClient:
    """Thread-safe; one instance serves every worker thread of a run."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        retry_base: float = 1.0,
        retry_max: float = 60.0,
        max_requests: int = 0,
        temperature: float = 1.0,
        max_tokens: int = 2048,
        stop: threading.Event | None = None,
    ):
        self.url = chat_url(endpoint)
        self.model = model
        self._api_key = api_key
        self.timeout, self.max_retries = timeout, max_retries
        self.retry_base, self.retry_max = retry_base, retry_max
        self.max_requests = max_requests  # 0: no budget
        self.temperature, self.max_tokens = temperature, max_tokens
        self.stop = stop or threading.Event()
        self.stats = ClientStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no key in any repr that might reach a log
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _take_budget(self) -> None:
        with self._lock:
            if self.max_requests and self.stats.requests >= self.max_requests:
                raise Stopped(f"the request budget ({self.max_requests}) is spent")
            self.stats.requests += 1

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            self._http_error(e)
        except TimeoutError as e:
            self._count(timeouts=1)
            raise _Retryable("timeout", f"no reply within {self.timeout} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                self._count(timeouts=1)
                raise _Retryable("timeout", f"no reply within {self.timeout} s") from e
            self._count(connection_errors=1)
            raise _Retryable("connection_error", str(e.reason)) from e
        except (ConnectionError, OSError) as e:  # reset mid-reply, http.client errors
            self._count(connection_errors=1)
            raise _Retryable("connection_error", str(e)) from e
        try:
            return json.loads(raw)
        except ValueError as e:
            self._count(bad_responses=1)
            raise _Retryable("bad_response", "the reply body is not JSON") from e

    def _http_error(self, e: urllib.error.HTTPError) -> NoReturn:
        status = e.code
        text = e.read()[:300].decode("utf-8", "replace")
        e.close()
        if self._api_key:  # some servers echo the key they refused
            text = text.replace(self._api_key, "***")
        if status in FATAL_STATUSES:
            raise EndpointRefused(
                f"{self.url} answered HTTP {status} ({text.strip() or e.reason}); check "
                "--endpoint, --model and the API key's environment variable"
            )
        if status == 429 or status >= 500:
            self._count(**({"http_429": 1} if status == 429 else {"http_5xx": 1}))
            raise _Retryable(f"http_{status}", text.strip(), _retry_after(e.headers))
        raise RequestFailed(f"http_{status}", text.strip())

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_max)
        # Full jitter around base * 2^attempt keeps many workers from retrying in step.
        return min(self.retry_max, self.retry_base * 2**attempt) * (0.5 + random.random() / 2)

    def complete(self, prompt: str, *, seed: int | None = None) -> tuple[str, dict[str, int]]:
        """The reply text (``""`` when the reply has none) and its token usage."""
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if seed is not None:
            payload["seed"] = seed  # honoured by vLLM, SGLang and OpenAI: reproducible sampling
        body = json.dumps(payload).encode()
        for attempt in range(self.max_retries + 1):
            self._take_budget()
            try:
                reply = self._post(body)
                return self._content(reply), self._usage(reply)
            except _Retryable as e:
                if attempt == self.max_retries:
                    self._count(failed_requests=1)
                    raise RequestFailed(e.reason, e.detail) from e
                self._count(retries=1)
                if self.stop.wait(self._backoff(attempt, e.retry_after)):
                    raise Stopped("stopped") from e
            except RequestFailed:
                self._count(failed_requests=1)
                raise
        raise AssertionError("unreachable")

    def _content(self, reply: Any) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            self._count(bad_responses=1)
            raise _Retryable("bad_response", "the reply has no choices[0].message") from None
        return content if isinstance(content, str) else ""

    def _usage(self, reply: dict[str, Any]) -> dict[str, int]:
        usage = reply.get("usage") or {}
        tokens = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        self._count(**tokens)
        return tokens


def _retry_after(headers: Any) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: use our own backoff
