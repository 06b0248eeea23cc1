"""Choosing and building the run's extractor (flows/extractors.py), against a real (test
harness) Prefect server."""

from __future__ import annotations

import asyncio

import pytest

from flows.extractors import build_extractor
from tasks.limits import LLMSlots, ensure_llm_limits
from tasks.llm import OpenAIExtractor

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
            await other_run.open()  # holds every slot: the set-up below waits

            async def set_up() -> None:
                async with build_extractor("openai", max_in_flight=2):
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
