"""Text LLM clients for question generation, with token and cost accounting.

Two backends share the :class:`ChatClient` interface (``complete(messages) -> ChatResult``):

* :class:`OpenAIChatClient` — any OpenAI-compatible ``POST {base_url}/chat/completions``
  endpoint over plain HTTP (stdlib ``urllib``, see :mod:`llmseg_ros.datagen.http`). Retries
  408/409/429/5xx, connection errors, timeouts and unreadable bodies with exponential
  backoff and jitter, honouring ``Retry-After``; other HTTP errors fail at once. Each
  request has a total deadline (retries and waits included) and a reply size limit, and
  redirects are refused, so the API key is only ever sent to the configured URL.
* :class:`llmseg_ros.datagen.local_llm.TransformersChatClient` — a local
  ``AutoModelForCausalLM`` with its tokenizer's chat template (torch/transformers loaded
  only when it is used).

:class:`UsageMeter` sums prompt/completion tokens from each response's ``usage`` and prices
them with :class:`Prices` (per 1000 tokens).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from llmseg_ros.datagen.config import DEFAULT_DEADLINE_S, DEFAULT_MAX_REPLY_BYTES, LLMConfig
from llmseg_ros.datagen.http import Deadline, DeadlineExceeded, ReplyTooLarge, post

LOGGER = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4"
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# wrong credentials, model or URL (a redirect is a URL to fix: it is never followed): no request can succeed
FATAL_STATUSES = frozenset({401, 403, 404}) | REDIRECT_STATUSES
ENV_BASE_URL = ("LLMSEG_LLM_BASE_URL", "OPENAI_BASE_URL", "OPENAI_API_BASE")
ENV_API_KEY = ("LLMSEG_LLM_API_KEY", "OPENAI_API_KEY")
ENV_MODEL = ("LLMSEG_LLM_MODEL", "OPENAI_MODEL")

Messages = Sequence[Mapping[str, str]]


class LLMRequestError(RuntimeError):
    """A chat request failed for good (non-retryable status, bad reply, or retries spent).

    Attributes:
        status: the last HTTP status, or ``None`` for connection-level failures.
        attempts: how many requests were sent.
    """

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


@dataclass(frozen=True)
class ChatResult:
    """One completed chat request.

    Attributes:
        text: the assistant message content.
        prompt_tokens, completion_tokens: from the reply's ``usage`` (0 when absent).
        attempts: requests sent to get it (1 = no retry).
        has_usage: whether the reply reported token usage.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1
    has_usage: bool = True


class ChatClient(Protocol):
    """Anything that turns chat messages into one assistant reply."""

    def complete(self, messages: Messages) -> ChatResult: ...


@dataclass(frozen=True)
class Prices:
    """Cost per 1000 tokens (any currency; 0 = free)."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_per_1k < 0 or self.completion_per_1k < 0:
            raise ValueError(f"prices must be >= 0, got {self.prompt_per_1k!r}, {self.completion_per_1k!r}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens / 1000.0 * self.prompt_per_1k + completion_tokens / 1000.0 * self.completion_per_1k
        )


@dataclass(frozen=True)
class Usage:
    """Totals of a :class:`UsageMeter` (or of a journal)."""

    requests: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    missing_usage: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "missing_usage": self.missing_usage,
            "cost": self.cost,
        }


class UsageMeter:
    """Thread-safe running totals over :class:`ChatResult` objects."""

    def __init__(self, prices: Prices | None = None) -> None:
        self.prices = prices or Prices()
        self._lock = threading.Lock()
        self._usage = Usage()

    def add(self, result: ChatResult) -> None:
        with self._lock:
            u = self._usage
            prompt = u.prompt_tokens + result.prompt_tokens
            completion = u.completion_tokens + result.completion_tokens
            self._usage = Usage(
                requests=u.requests + 1,
                attempts=u.attempts + result.attempts,
                prompt_tokens=prompt,
                completion_tokens=completion,
                missing_usage=u.missing_usage + (0 if result.has_usage else 1),
                cost=self.prices.cost(prompt, completion),  # from the totals: independent of arrival order
            )

    def snapshot(self) -> Usage:
        with self._lock:
            return self._usage


class MeteredClient:
    """Wraps a :class:`ChatClient` and records every successful reply in a :class:`UsageMeter`."""

    def __init__(self, client: ChatClient, meter: UsageMeter) -> None:
        self.client = client
        self.meter = meter

    def complete(self, messages: Messages) -> ChatResult:
        result = self.client.complete(messages)
        self.meter.add(result)
        return result


def _first_env(names: Sequence[str], environ: Mapping[str, str]) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def resolve_http_settings(
    config: LLMConfig, environ: Mapping[str, str] | None = None
) -> tuple[str, str, str | None]:
    """``(base_url, model, api_key)``: the config's values, else the environment, else defaults.

    Environment names, first found wins: base URL ``LLMSEG_LLM_BASE_URL``,
    ``OPENAI_BASE_URL``, ``OPENAI_API_BASE`` (default ``https://api.openai.com/v1``); model
    ``LLMSEG_LLM_MODEL``, ``OPENAI_MODEL`` (default ``gpt-4``, the paper's); API key
    ``LLMSEG_LLM_API_KEY``, ``OPENAI_API_KEY`` (none: no ``Authorization`` header).
    """
    env = os.environ if environ is None else environ
    base_url = config.base_url or _first_env(ENV_BASE_URL, env) or DEFAULT_BASE_URL
    model = config.model or _first_env(ENV_MODEL, env) or DEFAULT_MODEL
    api_key = config.api_key or _first_env(ENV_API_KEY, env)
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"LLM base URL must start with http:// or https://, got {base_url!r}")
    return base_url.rstrip("/"), model, api_key


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


class OpenAIChatClient:
    """Chat completions over HTTP against an OpenAI-compatible server.

    Args:
        base_url: API root including the version, e.g. ``https://api.openai.com/v1``.
        model: model name sent in the request body.
        api_key: sent as ``Authorization: Bearer …`` when given.
        timeout_s: limit of one socket operation (connect, one read) in seconds.
        deadline_s: wall-clock limit of one :meth:`complete` call, every attempt and
            backoff wait included (seconds); a reply still arriving then is abandoned.
        max_reply_bytes: largest reply body read; a larger one fails the request.
        max_retries: retries after the first attempt.
        backoff_base_s, backoff_max_s: retry ``k`` (0-based) waits
            ``min(max, base·2^k)·U(0.5, 1)`` seconds, or ``min(max, Retry-After)`` when the
            server sends that header.
        temperature: sent when not ``None``.
        max_tokens: completion budget per request.
        sleep: the wait function (tests pass a recorder).
        seed: seeds the jitter RNG.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        temperature: float | None = None,
        max_tokens: int = 1024,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty model name")
        for name, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if isinstance(max_reply_bytes, bool) or not isinstance(max_reply_bytes, int) or max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be an integer >= 1, got {max_reply_bytes!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.max_reply_bytes = max_reply_bytes
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: LLMConfig, environ: Mapping[str, str] | None = None) -> OpenAIChatClient:
        base_url, model, api_key = resolve_http_settings(config, environ)
        return cls(
            base_url,
            model,
            api_key,
            timeout_s=config.timeout_s,
            deadline_s=config.deadline_s,
            max_reply_bytes=config.max_reply_bytes,
            max_retries=config.max_retries,
            backoff_base_s=config.backoff_base_s,
            backoff_max_s=config.backoff_max_s,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        )

    def backoff_delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after)
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2.0**retry))
        with self._rng_lock:
            return ceiling * (0.5 + 0.5 * self._rng.random())

    def _request(self, messages: Messages) -> urllib.request.Request:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": self.max_tokens,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )

    @staticmethod
    def _read_reply(raw: bytes, attempts: int) -> ChatResult:
        payload = json.loads(raw.decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise LLMRequestError(f"reply has no text content (got {content!r:.80})", 200, attempts)
        usage = payload.get("usage")
        if isinstance(usage, Mapping):
            return ChatResult(
                content,
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                attempts,
            )
        return ChatResult(content, 0, 0, attempts, has_usage=False)

    def complete(self, messages: Messages) -> ChatResult:
        """Send ``messages`` (``[{"role": …, "content": …}]``) and return the first choice.

        Raises:
            LLMRequestError: a non-retryable HTTP status (a redirect included: it is never
                followed), a reply without text content or over ``max_reply_bytes``, the
                deadline passed, or every attempt failed.
        """
        if not messages:
            raise ValueError("messages must hold at least one {'role', 'content'} mapping")
        request = self._request(messages)
        deadline = Deadline(self.deadline_s)
        try:
            return self._attempts(request, deadline)
        finally:
            deadline.cancel()

    def _attempts(self, request: urllib.request.Request, deadline: Deadline) -> ChatResult:
        last_error = "no attempt made"
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                _, raw = post(
                    request, timeout_s=self.timeout_s, deadline=deadline, max_bytes=self.max_reply_bytes
                )
                return self._read_reply(raw, attempt + 1)
            except urllib.error.HTTPError as exc:
                status = exc.code
                last_error = self._http_error(exc)
                if exc.code not in RETRY_STATUSES:
                    raise LLMRequestError(
                        f"chat request to {self.url} failed: {last_error}", exc.code, attempt + 1
                    ) from exc
                retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except DeadlineExceeded as exc:
                raise LLMRequestError(
                    f"chat request to {self.url} failed: {exc} (deadline_s; attempt {attempt + 1}, "
                    f"last error: {last_error})",
                    status,
                    attempt + 1,
                ) from exc
            except ReplyTooLarge as exc:
                raise LLMRequestError(
                    f"chat request to {self.url} failed: {exc} (max_reply_bytes)", 200, attempt + 1
                ) from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                status = None
                last_error = f"{type(exc).__name__}: {exc}"
            except (
                ValueError,
                KeyError,
                IndexError,
                TypeError,
                RecursionError,
            ) as exc:  # unreadable 200 body
                status = 200
                last_error = f"unreadable reply ({type(exc).__name__}: {exc})"
            if attempt < self.max_retries:
                delay = self.backoff_delay(attempt, retry_after)
                if delay >= deadline.remaining():
                    raise LLMRequestError(
                        f"chat request to {self.url} failed: the deadline of {self.deadline_s:g} s (deadline_s) "
                        f"leaves no time for retry {attempt + 1}; last error: {last_error}",
                        status,
                        attempt + 1,
                    )
                LOGGER.warning("LLM request failed (%s); retry %d in %.2fs", last_error, attempt + 1, delay)
                self._sleep(delay)
        raise LLMRequestError(
            f"chat request to {self.url} failed after {self.max_retries + 1} attempts: {last_error}",
            status,
            self.max_retries + 1,
        )

    @staticmethod
    def _http_error(exc: urllib.error.HTTPError) -> str:
        """One line about an error answer; its body is read only up to 300 bytes."""
        if exc.code in REDIRECT_STATUSES:
            location = exc.headers.get("Location") if exc.headers else None
            return (
                f"HTTP {exc.code}: the server redirects to {location!r}; redirects are not followed (the API key "
                "must not travel to another address): set the base URL to the address the server expects"
            )
        try:
            detail = exc.read(300).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = "(body unreadable)"
        return f"HTTP {exc.code}: {detail}"
