"""Choosing and building the run's extractor (flows/extractors.py), against a real (test
harness) Prefect server."""

from __future__ import annotations

import asyncio

import pytest

from flows.extractors import build_extractor
from tasks.errors import ConfigurationError
from tasks.extract.einvoice import EmbeddedFirstExtractor
from tasks.extract.llm import OpenAIExtractor
from tasks.extract.rules import OfflineExtractor
from tasks.orchestration.limits import LLMSlots, ensure_llm_limits
from tasks.pdf.pool import PdfParser

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def test_a_set_up_that_stops_waiting_for_llm_slots_closes_the_client_built_meanwhile(
    monkeypatch,
):
    """The LLM client is built while the run waits for its slots; when the run stops waiting
    (another set-up step failed and cancelled this one), that client is closed, not leaked."""
    closed: list[OpenAIExtractor] = []
    real_aclose = OpenAIExtractor.aclose

    async def aclose(self: OpenAIExtractor) -> None:
        closed.append(self)
        await real_aclose(self)

    monkeypatch.setattr(OpenAIExtractor, "aclose", aclose)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # never called
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    await ensure_llm_limits(max_in_flight=2, requests_per_minute=60_000)
    try:
        async with LLMSlots(2, timeout=60) as other_run:
            await other_run.open(expected=2)  # holds every slot: the set-up below waits
            while other_run.held < 2:
                await asyncio.sleep(0.05)

            async def set_up() -> None:
                async with build_extractor("openai", max_in_flight=2, expected_calls=2):
                    pytest.fail("the set-up got slots another run holds")

            waiting = asyncio.create_task(set_up())
            await asyncio.sleep(1.0)  # the client is built long before this
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert len(closed) == 1
    finally:
        await ensure_llm_limits()


async def test_a_base_url_with_credentials_stops_the_set_up_not_each_invoice(monkeypatch):
    """Refused once, while the run is set up (the CLI prints it as one line and exits 2),
    rather than an `internal_error` traceback on every invoice; the password is not shown."""
    monkeypatch.setenv("OPENAI_BASE_URL", "http://svc-user:hunter2-Zq9@127.0.0.1:9/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for choice in ("auto", "openai"):
        with pytest.raises(ConfigurationError) as info:
            async with build_extractor(choice):
                pytest.fail("an extractor was built")
        assert "OPENAI_API_KEY" in str(info.value)
        assert "hunter2-Zq9" not in str(info.value) and "svc-user" not in str(info.value)
    async with build_extractor("offline") as extractor:  # reads no LLM setting
        assert extractor.name == "offline"


async def test_openai_without_a_key_or_a_url_is_a_configuration_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        async with build_extractor("openai"):
            pytest.fail("an extractor was built")


async def test_every_cpu_bound_step_gets_the_parser(monkeypatch):
    """Offline and LLM alike: the rules, the e-invoice XML and the page read that
    cross-checks it all run in the parser's pool, which need not be started yet."""
    parser = PdfParser("process", max_workers=1)
    try:
        async with build_extractor("offline", parser=parser) as offline:
            assert isinstance(offline, EmbeddedFirstExtractor) and offline.parser is parser
            assert (
                isinstance(offline.fallback, OfflineExtractor) and offline.fallback.parser is parser
            )
            assert (
                isinstance(offline.printed, OfflineExtractor) and offline.printed.parser is parser
            )
        monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # never called
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        await ensure_llm_limits(max_in_flight=2, requests_per_minute=60_000)
        try:
            async with build_extractor("openai", parser=parser, max_in_flight=2) as llm:
                assert isinstance(llm, EmbeddedFirstExtractor) and llm.parser is parser
                assert isinstance(llm.fallback, OpenAIExtractor)
                assert isinstance(llm.printed, OfflineExtractor) and llm.printed.parser is parser
        finally:
            await ensure_llm_limits()
        async with build_extractor("offline") as inline:  # no parser: inline, as before
            assert inline.parser is None and inline.fallback.parser is None
    finally:
        parser.close()
