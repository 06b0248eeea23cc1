"""A local OpenAI-compatible chat-completions server with latency and fault injection.

It answers `POST /v1/chat/completions` (structured output through `response_format`) and
`GET /v1/models` the way the OpenAI API does, so the unmodified `openai` SDK can be pointed
at it (`base_url=server.base_url`). The "model" is a plain function of the document text
(by default `tasks.extract.rules.extract_fields`, the offline rules extractor); faults, latency and
a requests-per-minute cap are injected around it, by probability (seeded) or
deterministically (`fail_next`).

In-process (tests)::

    with FakeLLMServer(FakeLLMConfig(latency=0.05)) as server:
        server.fail_next("rate_limit", 2)
        client = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        ...
        assert server.total_requests == 3

Standalone: ``python -m testing.fake_llm --port 8811 --latency 1.0 --rate-429 0.1`` (see `main`).

The Authorization header is never logged or recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import json
import logging
import math
import os
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web

log = logging.getLogger("testing.fake_llm")

#: What an answer function may return: an `Invoice` (any pydantic model), a mapping (sent as
#: JSON) or a string (sent as the message content verbatim).
AnswerResult = Any | Mapping[str, Any] | str
AnswerFn = Callable[[str], AnswerResult | Awaitable[AnswerResult]]

#: Injectable fault kinds, in the order their probabilities are stacked for one random draw.
FAULT_KINDS = (
    "rate_limit",  # 429, code rate_limit_exceeded, Retry-After header
    "quota",  # 429, code insufficient_quota (final: retrying does not help)
    "server_error",  # 500
    "auth",  # 401, code invalid_api_key
    "bad_request",  # 400, invalid_request_error
    "hang",  # never answers until the client disconnects or the server stops
    "malformed",  # 200, content is not JSON
    "schema_invalid",  # 200, content is JSON of the wrong shape
    "refusal",  # 200, message.refusal set, content null
)

_ALIASES = {
    "429": "rate_limit",
    "rate_limited": "rate_limit",
    "rate_limit_exceeded": "rate_limit",
    "insufficient_quota": "quota",
    "500": "server_error",
    "5xx": "server_error",
    "401": "auth",
    "bad_key": "auth",
    "400": "bad_request",
    "timeout": "hang",
    "not_json": "malformed",
    "invalid_json": "malformed",
    "schema": "schema_invalid",
    "refused": "refusal",
}

# Config attribute holding each fault's probability.
_RATE_FIELDS = {
    "rate_limit": "error_rate_429",
    "quota": "error_rate_quota",
    "server_error": "error_rate_500",
    "auth": "error_rate_401",
    "bad_request": "error_rate_400",
    "hang": "hang_rate",
    "malformed": "malformed_rate",
    "schema_invalid": "schema_invalid_rate",
    "refusal": "refusal_rate",
}


def fault_kind(kind: str) -> str:
    """Normalise a fault name or alias ("429", "500", "timeout", ...) to one of FAULT_KINDS."""
    k = _ALIASES.get(str(kind).lower(), str(kind).lower())
    if k not in FAULT_KINDS:
        raise ValueError(
            f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS} or {sorted(_ALIASES)}"
        )
    return k


@dataclass
class FakeLLMConfig:
    """Behaviour of the fake server. Attributes may be changed at runtime (e.g. from a test)."""

    model: str = "fake-gpt-4o-mini"
    # Latency of answered requests (200s and 500s; 401/429/400 answer at once).
    latency: float = 0.0  # fixed seconds, used when latency_median is None
    latency_median: float | None = None  # log-normal latency: median seconds ...
    latency_sigma: float = 0.5  # ... and sigma of the underlying normal
    latency_max: float | None = None  # cap on any drawn latency
    seed: int | None = 0  # seeds fault and latency draws (None: unseeded)
    # Fault probabilities per request; one draw per request, so they should sum to <= 1.
    error_rate_429: float = 0.0
    error_rate_quota: float = 0.0
    error_rate_500: float = 0.0
    error_rate_401: float = 0.0
    error_rate_400: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    schema_invalid_rate: float = 0.0
    refusal_rate: float = 0.0
    # 429 details: Retry-After in seconds (fractional values are sent as-is, as OpenAI's
    # SDK accepts them) and, when retry_after_ms_header, also `retry-after-ms`.
    retry_after: float = 1.0
    retry_after_ms_header: bool = True
    # Requests-per-minute cap over a sliding 60 s window; above it: 429 with Retry-After.
    rpm_limit: int | None = None
    # When set, requests whose `Authorization: Bearer <key>` differs get 401.
    require_api_key: str | None = None
    # Reject response_format json_schema with strict=True whose schema OpenAI would refuse
    # (objects without additionalProperties:false, properties missing from required, defaults).
    enforce_strict_schema: bool = True

    def __repr__(self) -> str:  # never show the expected key
        items = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "require_api_key" and value is not None:
                value = "***"
            items.append(f"{f.name}={value!r}")
        return f"FakeLLMConfig({', '.join(items)})"


# --------------------------------------------------------------------------------------------
# Request helpers


_DOC_RE = re.compile(r"<document[^>]*>(.*)</document>", re.DOTALL | re.IGNORECASE)


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one chat message (string content or a list of text parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def document_text(messages: list[Mapping[str, Any]]) -> str:
    """The document the client sent: the text inside <document>...</document> of the last user
    message (with neutralised delimiters restored), or that message's whole text."""
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users:
        return ""
    text = message_text(users[-1])
    match = _DOC_RE.search(text)
    if match:
        text = match.group(1).strip("\n")
        text = re.sub(r"&lt;(/?\s*document)", r"<\1", text, flags=re.IGNORECASE)
    return text


def strict_schema_problems(schema: Any, path: str = "$") -> list[str]:
    """What OpenAI's strict structured-output mode would reject in this JSON schema (the
    subset that matters here: closed objects, every property required, no defaults)."""
    problems: list[str] = []
    if isinstance(schema, Mapping):
        if "default" in schema:
            problems.append(f"{path}: 'default' is not permitted")
        if schema.get("type") == "object" or "properties" in schema:
            if schema.get("additionalProperties") is not False:
                problems.append(
                    f"{path}: 'additionalProperties' is required to be supplied and to be false"
                )
            props = schema.get("properties") or {}
            missing = [k for k in props if k not in (schema.get("required") or [])]
            if missing:
                problems.append(
                    f"{path}: 'required' is required to include every property; missing {missing}"
                )
        for key, value in schema.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, Mapping):
                for name, sub in value.items():
                    problems += strict_schema_problems(sub, f"{path}.{key}.{name}")
            elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
                problems += strict_schema_problems(value, f"{path}.{key}")
            elif key in ("anyOf", "allOf", "oneOf", "prefixItems") and isinstance(value, list):
                for i, sub in enumerate(value):
                    problems += strict_schema_problems(sub, f"{path}.{key}[{i}]")
    return problems


def _tokens(text: str) -> int:
    return len(text) // 4


def _default_answer(text: str) -> Any:
    from tasks.extract.rules import extract_fields  # lazy: the offline extractor

    return extract_fields(text)


def _content_of(result: Any) -> str:
    if isinstance(result, str):
        return result
    if hasattr(result, "model_dump_json"):
        return result.model_dump_json()
    return json.dumps(result, default=str)


def _format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _error(
    status: int, message: str, type_: str, code: str | None, *, headers=None, param=None
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    hdrs = {"x-request-id": f"req_{uuid.uuid4().hex}"}
    hdrs.update(headers or {})
    return web.json_response(body, status=status, headers=hdrs)


class _Stop(Exception):
    pass


# --------------------------------------------------------------------------------------------
# The server


class FakeLLMServer:
    """The fake OpenAI server; `start()` runs it on its own event loop in a daemon thread."""

    def __init__(
        self,
        config: FakeLLMConfig | None = None,
        *,
        answer: AnswerFn | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.config = config or FakeLLMConfig()
        self.answer: AnswerFn = answer or _default_answer
        self.host = host
        self._requested_port = port
        self.port: int | None = None

        self._lock = threading.Lock()
        self._faults: collections.deque[str] = collections.deque()
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(
            None if self.config.seed is None else self.config.seed + 1
        )
        self._rpm_window: collections.deque[float] = collections.deque()
        self._total = 0
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._last_request: dict[str, Any] | None = None

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- control -----------------------------------------------------------------------

    def fail_next(self, kind: str, n: int = 1) -> None:
        """Make the next `n` chat requests fail with `kind` (before any random fault)."""
        k = fault_kind(kind)
        with self._lock:
            self._faults.extend([k] * n)

    def reset_stats(self) -> None:
        with self._lock:
            self._total = 0
            self._outcomes.clear()
            self._max_in_flight = self._in_flight
            self._last_request = None
            self._rpm_window.clear()

    # ---- counters (thread-safe snapshots) ------------------------------------------------

    @property
    def total_requests(self) -> int:
        with self._lock:
            return self._total

    @property
    def outcomes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._outcomes)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    @property
    def last_request(self) -> dict[str, Any] | None:
        """The JSON body of the last chat request (a deep copy)."""
        with self._lock:
            return (
                json.loads(json.dumps(self._last_request))
                if self._last_request is not None
                else None
            )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total_requests": self._total,
                "outcomes": dict(self._outcomes),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
            }

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    def start(self, timeout: float = 10.0) -> FakeLLMServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fake-llm", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fake LLM server did not start in time")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(
                f"fake LLM server failed to start: {self._start_error!r}"
            ) from self._start_error
        log.info("fake LLM listening on %s", self.base_url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception:  # pragma: no cover - best effort
                log.exception("fake LLM shutdown failed")
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None
        log.info("fake LLM stopped")

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        # handler_cancellation: a client that disconnects (e.g. its timeout fired) cancels
        # the handler, so a hang or a slow answer frees its in-flight slot at once.
        self._runner = web.AppRunner(
            self.build_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- handlers ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, **self.stats()})

    async def _models(self, request: web.Request) -> web.Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "fake-llm",
                    }
                ],
            }
        )

    def _check_key(self, request: web.Request) -> web.Response | None:
        expected = self.config.require_api_key
        if expected is None:
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if given == expected:
            return None
        return self._auth_error(given)

    @staticmethod
    def _auth_error(given: str) -> web.Response:
        # Like OpenAI, show only a masked hint of what was sent.
        hint = f"{given[:3]}***{given[-4:]}" if len(given) >= 12 else "***"
        return _error(
            401,
            f"Incorrect API key provided: {hint}. You can find your API key in your account settings.",
            "invalid_request_error",
            "invalid_api_key",
        )

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] += 1

    def _draw_fault(self) -> str | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
        u = self._fault_rng.random()
        acc = 0.0
        for kind in FAULT_KINDS:
            acc += float(getattr(self.config, _RATE_FIELDS[kind]) or 0.0)
            if u < acc:
                return kind
        return None

    def _draw_latency(self) -> float:
        cfg = self.config
        if cfg.latency_median is not None and cfg.latency_median > 0:
            d = self._latency_rng.lognormvariate(
                math.log(cfg.latency_median), max(cfg.latency_sigma, 0.0)
            )
        else:
            d = max(cfg.latency, 0.0)
        if cfg.latency_max is not None:
            d = min(d, cfg.latency_max)
        return d

    def _rpm_retry_after(self) -> float | None:
        """Admit the request under the RPM cap (None) or say how long until a slot frees."""
        limit = self.config.rpm_limit
        if not limit:
            return None
        now = time.monotonic()
        with self._lock:
            while self._rpm_window and now - self._rpm_window[0] >= 60.0:
                self._rpm_window.popleft()
            if len(self._rpm_window) >= limit:
                return max(0.001, 60.0 - (now - self._rpm_window[0]))
            self._rpm_window.append(now)
        return None

    def _rate_limit_headers(self, seconds: float) -> dict[str, str]:
        headers = {"Retry-After": _format_seconds(seconds)}
        if self.config.retry_after_ms_header:
            headers["retry-after-ms"] = str(max(0, round(seconds * 1000)))
        return headers

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but give up when the server stops."""
        if seconds <= 0:
            return
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise _Stop()

    async def _hang(self, request: web.Request) -> None:
        """Wait until the client goes away or the server stops."""
        assert self._stopping is not None
        while not self._stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=0.05)
            except TimeoutError:
                pass
        raise _Stop()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        with self._lock:
            self._total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        outcome = "error"
        try:
            outcome, response = await self._chat_inner(request)
            return response
        except _Stop:
            outcome = "stopped"
            return _error(503, "The server is shutting down.", "server_error", None)
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
            log.debug("POST %s -> %s in %.3fs", request.path, outcome, time.monotonic() - started)

    async def _chat_inner(self, request: web.Request) -> tuple[str, web.Response]:
        cfg = self.config
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except Exception:
            self._count("bad_request")
            return "bad_request", _error(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
            )
        with self._lock:
            self._last_request = body

        if (denied := self._check_key(request)) is not None:
            self._count("auth")
            return "auth", denied

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._count("bad_request")
            return "bad_request", _error(
                400,
                "'messages' is a required property",
                "invalid_request_error",
                None,
                param="messages",
            )
        response_format = body.get("response_format") or {}
        if cfg.enforce_strict_schema and response_format.get("type") == "json_schema":
            js = response_format.get("json_schema") or {}
            if js.get("strict"):
                problems = strict_schema_problems(js.get("schema"))
                if problems:
                    self._count("bad_request")
                    return "bad_request", _error(
                        400,
                        f"Invalid schema for response_format '{js.get('name')}': "
                        + "; ".join(problems),
                        "invalid_request_error",
                        "invalid_json_schema",
                        param="response_format",
                    )

        wait = self._rpm_retry_after()
        if wait is not None:
            self._count("rpm_limited")
            return "rpm_limited", _error(
                429,
                f"Rate limit reached for {body.get('model')} on requests per min (RPM): "
                f"Limit {cfg.rpm_limit}. Please try again in {wait:.3f}s.",
                "requests",
                "rate_limit_exceeded",
                headers=self._rate_limit_headers(wait),
            )

        fault = self._draw_fault()
        model = body.get("model") or cfg.model
        if fault == "rate_limit":
            self._count(fault)
            return fault, _error(
                429,
                f"Rate limit reached for {model} on tokens per min (TPM). "
                f"Please try again in {_format_seconds(cfg.retry_after)}s.",
                "tokens",
                "rate_limit_exceeded",
                headers=self._rate_limit_headers(cfg.retry_after),
            )
        if fault == "quota":
            self._count(fault)
            return fault, _error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
        if fault == "auth":
            self._count(fault)
            return fault, self._auth_error("")
        if fault == "bad_request":
            self._count(fault)
            return fault, _error(
                400, "Invalid request (injected fault).", "invalid_request_error", None
            )
        if fault == "hang":
            self._count(fault)
            await self._hang(request)
            return fault, _error(503, "The client went away.", "server_error", None)

        await self._sleep(self._draw_latency())
        if fault == "server_error":
            self._count(fault)
            return fault, _error(
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            )

        refusal: str | None = None
        if fault == "malformed":
            content: str | None = 'Sure! Here is the invoice: {"vendor_name": "ACME", "total": 12.5'
        elif fault == "schema_invalid":
            content = json.dumps({"vendor": "ACME", "amount_due": "twelve", "items": "none"})
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, but I can't help with that request."
        else:
            result = self.answer(document_text(messages))
            if inspect.isawaitable(result):
                result = await result
            content = _content_of(result)
        outcome = fault or "ok"
        self._count(outcome)

        prompt_tokens = _tokens(
            "".join(message_text(m) for m in messages if isinstance(m, Mapping))
        )
        completion_tokens = _tokens(content or refusal or "")
        completion: dict[str, object] = {  # the chat.completion JSON object
            "id": f"chatcmpl-fake{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake_llm",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": refusal,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return outcome, web.json_response(
            completion, headers={"x-request-id": f"req_{uuid.uuid4().hex}"}
        )


# --------------------------------------------------------------------------------------------
# Standalone


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fake-llm",
        description="A local OpenAI-compatible server with latency and fault injection.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8811, help="port to listen on")
    p.add_argument("--model", default=FakeLLMConfig.model, help="model name it answers as")
    p.add_argument("--latency", type=float, default=0.0, help="fixed latency in seconds")
    p.add_argument(
        "--latency-median", type=float, default=None, help="log-normal latency median (seconds)"
    )
    p.add_argument("--latency-sigma", type=float, default=0.5, help="log-normal latency sigma")
    p.add_argument("--latency-max", type=float, default=None, help="cap on drawn latency (seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault and latency draws")
    p.add_argument("--rate-429", type=float, default=0.0, help="probability of a 429 rate limit")
    p.add_argument(
        "--rate-quota", type=float, default=0.0, help="probability of a 429 insufficient_quota"
    )
    p.add_argument("--rate-500", type=float, default=0.0, help="probability of a 500 server error")
    p.add_argument(
        "--rate-401", type=float, default=0.0, help="probability of a 401 authentication error"
    )
    p.add_argument("--rate-400", type=float, default=0.0, help="probability of a 400 bad request")
    p.add_argument(
        "--rate-hang", type=float, default=0.0, help="probability of a request that never answers"
    )
    p.add_argument(
        "--rate-malformed",
        type=float,
        default=0.0,
        help="probability of an answer that is not JSON",
    )
    p.add_argument(
        "--rate-schema-invalid",
        type=float,
        default=0.0,
        help="probability of JSON that breaks the schema",
    )
    p.add_argument("--rate-refusal", type=float, default=0.0, help="probability of a refusal")
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on 429")
    p.add_argument(
        "--no-retry-after-ms", action="store_true", help="send only Retry-After, not retry-after-ms"
    )
    p.add_argument("--rpm", type=int, default=None, help="requests-per-minute cap (none: no cap)")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require 'Authorization: Bearer $VAR' (the key is read from this environment variable, "
        "never from the command line)",
    )
    p.add_argument("--log-level", default="INFO", help="logging level of the server")
    return p


def config_from_args(args: argparse.Namespace) -> FakeLLMConfig:
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"environment variable {args.api_key_env} is not set")
    return FakeLLMConfig(
        model=args.model,
        latency=args.latency,
        latency_median=args.latency_median,
        latency_sigma=args.latency_sigma,
        latency_max=args.latency_max,
        seed=args.seed,
        error_rate_429=args.rate_429,
        error_rate_quota=args.rate_quota,
        error_rate_500=args.rate_500,
        error_rate_401=args.rate_401,
        error_rate_400=args.rate_400,
        hang_rate=args.rate_hang,
        malformed_rate=args.rate_malformed,
        schema_invalid_rate=args.rate_schema_invalid,
        refusal_rate=args.rate_refusal,
        retry_after=args.retry_after,
        retry_after_ms_header=not args.no_retry_after_ms,
        rpm_limit=args.rpm,
        require_api_key=key,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the fake server in the foreground until Ctrl-C / SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    config = config_from_args(args)
    server = FakeLLMServer(config, host=args.host, port=args.port)
    done = threading.Event()

    def _on_signal(signum, frame):
        done.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_signal) if in_main else None
    server.start()
    print(f"fake LLM listening on {server.base_url}  config: {config!r}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        print(f"fake LLM stopped; {json.dumps(server.stats())}", flush=True)
    return 0


__all__ = [
    "FAULT_KINDS",
    "FakeLLMConfig",
    "FakeLLMServer",
    "build_parser",
    "document_text",
    "fault_kind",
    "main",
    "strict_schema_problems",
]
