"""A fault-injecting HTTP reverse proxy for S3 tests.

    proxy = S3FaultProxy(moto_endpoint).start()
    proxy.inject(method="PUT", key_contains="manifest.json", status=409, code="ConditionalRequestConflict")
    ...  # point the S3 client at proxy.endpoint
    proxy.stop()

Requests are forwarded unchanged (method, raw path and query, headers including Host, body),
so SigV4 signatures still verify upstream; responses are passed back as they come (no
decompression). The proxy runs its own event loop in a daemon thread, so it serves clients
in any loop, sync or async.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from yarl import URL

# Per-connection headers that a proxy must not forward (RFC 9110 section 7.6.1), plus Expect:
# the proxy answers 100-continue itself and reads the whole body before forwarding (SigV4
# does not sign Expect).
_HOP_BY_HOP = {
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


@dataclass
class FaultRule:
    method: str | None = None
    key_contains: str | None = None
    times: int | None = 1
    status: int | None = None
    code: str | None = None
    delay: float = 0.0
    reset: bool = False
    probability: float = 1.0
    seed: int | None = None
    hits: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return not (self.key_contains is not None and self.key_contains not in path)

    def try_fire(self) -> bool:
        """Counts a hit and returns True when the rule fires for this request."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.probability < 1.0 and self._rng.random() >= self.probability:
            return False
        self.hits += 1
        return True


def _error_body(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        "<RequestId>s3-fault-proxy</RequestId></Error>"
    ).encode()


class S3FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = URL(upstream.rstrip("/"))
        self.endpoint = ""
        self.requests: list[tuple[str, str]] = []  # (method, decoded path) in arrival order
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()  # rules and requests are shared with the test thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle

    def start(self) -> S3FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as e:  # report to start(), then end the thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop_server())
            loop.close()

        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("S3FaultProxy did not start within 10 s")
        if failure:
            raise RuntimeError("S3FaultProxy failed to start") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start_server(self) -> None:
        # No pooling upstream: every proxied request gets a fresh connection, so a reset
        # injected towards the client never leaves a half-used upstream connection behind.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def _stop_server(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- rules

    def inject(
        self,
        *,
        method: str | None = None,
        key_contains: str | None = None,
        times: int | None = 1,
        status: int | None = None,
        code: str | None = None,
        delay: float = 0.0,
        reset: bool = False,
        probability: float = 1.0,
        seed: int | None = None,
    ) -> FaultRule:
        """Add a rule. A firing rule sleeps `delay`, then drops the connection (`reset`),
        answers `status` with an S3 XML error `code`, or (delay only) forwards."""
        if status is None and code is not None:
            raise ValueError("code needs a status")
        rule = FaultRule(
            method=method,
            key_contains=key_contains,
            times=times,
            status=status,
            code=code,
            delay=delay,
            reset=reset,
            probability=probability,
            seed=seed,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    def _pick(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self._rules:
                if rule.matches(method, path) and rule.try_fire():
                    return rule
        return None

    # -- proxying

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # The low-level aiohttp server does not answer Expect: 100-continue by itself (only
        # routed apps do), and botocore sends it on every PutObject: without this the client
        # waits for the go-ahead and the proxy for the body.
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await request.read()
        rule = self._pick(request.method, request.path)
        if rule is not None:
            if rule.delay:
                await asyncio.sleep(rule.delay)
            if rule.reset:
                if request.transport is not None:
                    request.transport.abort()
                # The connection is gone; aiohttp discards whatever is returned here.
                return web.Response(status=499)
            if rule.status is not None:
                code = rule.code or f"InjectedFault{rule.status}"
                return web.Response(
                    status=rule.status,
                    body=b""
                    if request.method == "HEAD"
                    else _error_body(code, "injected by S3FaultProxy"),
                    content_type="application/xml",
                )
        return await self._forward(request, body)

    async def _forward(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        # raw_path keeps the client's percent-encoding byte for byte (what SigV4 signed).
        url = URL(str(self.upstream) + request.raw_path, encoded=True)
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
