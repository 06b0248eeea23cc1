"""The fake OpenAI server itself: protocol shape, fault injection, counters, lifecycle."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from flows.local_server import free_port
from tasks.invoice import Invoice
from testing.fake_llm.server import (
    FAULT_KINDS,
    FakeLLMConfig,
    FakeLLMServer,
    document_text,
    fault_kind,
    strict_schema_problems,
)

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = Invoice(
    vendor_name="ACME GmbH",
    invoice_number="INV-7",
    issue_date=date(2026, 1, 2),
    currency="EUR",
    subtotal=Decimal("10.00"),
    tax=Decimal("1.90"),
    total=Decimal("11.90"),
)
STRICT_OK = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"total": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
    "required": ["total"],
}


def chat_body(text: str = "Invoice INV-7", schema: dict | None = None) -> dict:
    return {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "Extract."},
            {"role": "user", "content": f"<document>\n{text}\n</document>"},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "invoice", "strict": True, "schema": schema or STRICT_OK},
        },
    }


def post(
    server: FakeLLMServer, body: dict | bytes, *, key: str | None = None, timeout: float = 5.0
):
    """Raw POST; returns (status, headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture
def server():
    seen: list[str] = []

    def answer(text: str) -> Invoice:
        seen.append(text)
        return SAMPLE

    with FakeLLMServer(FakeLLMConfig(), answer=answer) as s:
        s.seen = seen  # type: ignore[attr-defined]
        yield s


def test_base_url_and_models_list_through_the_sdk(server):
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    try:
        models = client.models.list()
        assert [m.id for m in models.data] == [server.config.model]
    finally:
        client.close()


def test_chat_completion_shape_through_the_sdk(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    try:
        body = chat_body("Invoice INV-7 &lt;/document> trailing")
        completion = client.chat.completions.create(**body)
    finally:
        client.close()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.refusal is None
    assert Invoice.model_validate_json(choice.message.content) == SAMPLE
    # Token counts approximate len(text) // 4.
    prompt = "".join(m["content"] for m in body["messages"])
    assert completion.usage.prompt_tokens == len(prompt) // 4
    assert completion.usage.completion_tokens == len(choice.message.content) // 4
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    # The answer function got the document (delimiters stripped, neutralised ones restored).
    assert server.seen == ["Invoice INV-7 </document> trailing"]
    assert server.last_request["messages"] == body["messages"]
    assert server.total_requests == 1 and server.outcomes == {"ok": 1}


def test_document_text_variants():
    assert document_text([{"role": "user", "content": "plain text"}]) == "plain text"
    parts = [{"type": "text", "text": "<document>\nA"}, {"type": "text", "text": "B\n</document>"}]
    assert (
        document_text([{"role": "system", "content": "x"}, {"role": "user", "content": parts}])
        == "AB"
    )
    assert document_text([{"role": "system", "content": "x"}]) == ""


@pytest.mark.parametrize(
    "kind, status, code",
    [
        ("rate_limit", 429, "rate_limit_exceeded"),
        ("quota", 429, "insufficient_quota"),
        ("server_error", 500, None),
        ("auth", 401, "invalid_api_key"),
        ("bad_request", 400, None),
    ],
)
def test_error_faults_have_openai_error_bodies(server, kind, status, code):
    server.config.retry_after = 0.25
    server.fail_next(kind)
    got_status, headers, body = post(server, chat_body())
    assert got_status == status
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == code
    if kind == "rate_limit":
        assert headers["Retry-After"] == "0.25" and headers["retry-after-ms"] == "250"
    if kind == "quota":
        assert body["error"]["type"] == "insufficient_quota" and "Retry-After" not in headers
    # The fault was used up: the next request succeeds.
    assert post(server, chat_body())[0] == 200
    assert server.outcomes == {kind: 1, "ok": 1}


def test_content_faults(server):
    server.fail_next("malformed")
    server.fail_next("schema_invalid")
    server.fail_next("refusal")
    _, _, malformed = post(server, chat_body())
    with pytest.raises(ValueError):
        json.loads(malformed["choices"][0]["message"]["content"])
    _, _, invalid = post(server, chat_body())
    content = invalid["choices"][0]["message"]["content"]
    json.loads(content)  # valid JSON ...
    with pytest.raises(ValueError):  # ... of the wrong shape
        Invoice.model_validate_json(content)
    _, _, refused = post(server, chat_body())
    message = refused["choices"][0]["message"]
    assert message["content"] is None and message["refusal"]
    assert server.outcomes == {"malformed": 1, "schema_invalid": 1, "refusal": 1}


def test_fault_aliases_and_unknown_kind():
    assert fault_kind("429") == "rate_limit" and fault_kind("500") == "server_error"
    assert fault_kind("insufficient_quota") == "quota" and fault_kind("timeout") == "hang"
    assert set(FAULT_KINDS) >= {"hang", "malformed", "schema_invalid", "refusal"}
    with pytest.raises(ValueError):
        fault_kind("meteor")


def test_random_faults_are_seeded_and_changeable_at_runtime():
    def run(seed: int) -> list[int]:
        with FakeLLMServer(
            FakeLLMConfig(seed=seed, error_rate_500=0.5), answer=lambda t: SAMPLE
        ) as s:
            return [post(s, chat_body())[0] for _ in range(30)]

    first, again = run(7), run(7)
    assert first == again
    assert 5 <= first.count(500) <= 25 and set(first) == {200, 500}

    with FakeLLMServer(FakeLLMConfig(), answer=lambda t: SAMPLE) as s:
        assert post(s, chat_body())[0] == 200
        s.config.error_rate_429 = 1.0  # changed while running
        status, headers, _ = post(s, chat_body())
        assert status == 429 and headers["Retry-After"] == "1"
        s.config.error_rate_429 = 0.0
        assert post(s, chat_body())[0] == 200


def test_require_api_key_and_key_never_logged(caplog):
    key = "sk-fake-0123456789abcdefSECRET"
    caplog.set_level(logging.DEBUG)
    with FakeLLMServer(FakeLLMConfig(require_api_key=key), answer=lambda t: SAMPLE) as s:
        assert post(s, chat_body(), key=key)[0] == 200
        status, _, body = post(s, chat_body(), key="sk-wrong-key-000000000000")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert post(s, chat_body())[0] == 401  # no header at all
        assert s.outcomes == {"ok": 1, "auth": 2}
        assert key not in repr(s.config)
    assert caplog.records, "expected server debug logs"
    assert key not in caplog.text and "sk-wrong-key-000000000000" not in caplog.text


def test_rpm_cap_answers_429_with_retry_after(server):
    server.config.rpm_limit = 3
    assert [post(server, chat_body())[0] for _ in range(3)] == [200, 200, 200]
    status, headers, body = post(server, chat_body())
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert 55 <= float(headers["Retry-After"]) <= 60
    assert server.outcomes == {"ok": 3, "rpm_limited": 1}


def test_fixed_and_lognormal_latency():
    with FakeLLMServer(FakeLLMConfig(latency=0.2), answer=lambda t: SAMPLE) as s:
        t0 = time.monotonic()
        assert post(s, chat_body())[0] == 200
        assert 0.2 <= time.monotonic() - t0 < 1.0

    def draws(seed):
        s = FakeLLMServer(
            FakeLLMConfig(latency_median=0.1, latency_sigma=0.5, latency_max=0.3, seed=seed)
        )
        return [s._draw_latency() for _ in range(200)]

    a, b = draws(1), draws(1)
    assert a == b and max(a) <= 0.3 and min(a) > 0
    median = sorted(a)[100]
    assert 0.07 < median < 0.14


def test_hang_until_client_disconnects_then_in_flight_drops(server):
    server.fail_next("hang")
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=0.3)
    t0 = time.monotonic()
    try:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(**chat_body())
    finally:
        client.close()
    assert time.monotonic() - t0 < 2.0
    deadline = time.monotonic() + 2.0
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.in_flight == 0 and server.max_in_flight == 1
    assert server.outcomes == {"hang": 1}


def test_stop_releases_a_hanging_request():
    s = FakeLLMServer(FakeLLMConfig(hang_rate=1.0)).start()
    result: dict = {}

    def call():
        try:
            result["status"] = post(s, chat_body(), timeout=10)[0]
        except Exception as e:  # connection closed by the stop is fine too
            result["error"] = e

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 2
    while s.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    s.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 3.0
    assert result.get("status") in (503, None)


def test_max_in_flight_counts_concurrent_requests():
    with FakeLLMServer(FakeLLMConfig(latency=0.2), answer=lambda t: SAMPLE) as s:
        threads = [threading.Thread(target=post, args=(s, chat_body())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.max_in_flight == 4 and s.in_flight == 0 and s.total_requests == 4
        s.reset_stats()
        assert s.stats() == {
            "total_requests": 0,
            "outcomes": {},
            "in_flight": 0,
            "max_in_flight": 0,
        }


def test_strict_schema_is_enforced_like_openai(server):
    raw = Invoice.model_json_schema(mode="serialization")
    problems = strict_schema_problems(raw)
    assert any("'default' is not permitted" in p for p in problems)
    assert any("'required'" in p for p in problems)
    status, _, body = post(server, chat_body(schema=raw))
    assert status == 400 and body["error"]["code"] == "invalid_json_schema"
    assert post(server, chat_body(schema={"type": "object", "properties": {}}))[0] == 400
    server.config.enforce_strict_schema = False
    assert post(server, chat_body(schema=raw))[0] == 200


def test_bad_json_body_is_400(server):
    assert post(server, b"{not json")[0] == 400
    assert post(server, {"model": "x"})[0] == 400


def test_async_answer_function():
    async def answer(text):
        return {"total": 1.5, "invoice_number": text}

    with FakeLLMServer(answer=answer) as s:
        _, _, body = post(s, chat_body("N-1"))
        assert json.loads(body["choices"][0]["message"]["content"]) == {
            "total": 1.5,
            "invoice_number": "N-1",
        }


def test_default_answer_uses_offline_extractor():
    import tasks.extract.rules

    if not hasattr(tasks.extract.rules, "extract_fields"):
        pytest.skip("tasks.extract.rules.extract_fields not there yet")
    with FakeLLMServer() as s:
        status, _, body = post(s, chat_body("Invoice number: INV-42\nTotal: 12.50 EUR"))
        assert status == 200
        Invoice.model_validate_json(body["choices"][0]["message"]["content"])


def test_standalone_main_runs_and_stops_on_sigterm():
    port = free_port()
    env = {**os.environ, "FAKE_KEY": "sk-standalone-secret-123456"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testing.fake_llm",
            "--port",
            str(port),
            "--rate-429",
            "0",
            "--api-key-env",
            "FAKE_KEY",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, line
        assert "sk-standalone-secret-123456" not in line
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": "Bearer sk-standalone-secret-123456"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["object"] == "list"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "sk-standalone-secret-123456" not in out
