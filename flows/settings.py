"""A run's settings: every parameter of `process-invoices` with its type, bounds and default,
defined once.

The flow's signature is written with these types and `DEFAULTS` (Prefect builds the run form
and validates deployment runs from the signature, so it must stay a plain signature);
tests/test_settings.py checks that it matches `RunSettings` exactly, also as `prefect deploy`
reads it from the source, and validates prefect.yaml's parameters with it. `invoices run`
builds its options from `RunSettings` (flows/cli.py). The parameters' descriptions are the
flow's docstring, which the run form shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from tasks.pipeline import valid_shard

BUNDLED_SAMPLES = str(Path(__file__).resolve().parents[1] / "samples" / "invoices")

Location = Annotated[str, Field(min_length=1)]  # s3://bucket/prefix or a folder path
ExtractorChoice = Literal["auto", "offline", "openai"]
ParseExecutor = Literal["process", "thread"]
Concurrency = Annotated[int, Field(ge=1, le=10_000)]
Count = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(ge=1)]
GraceSeconds = Annotated[float, Field(ge=0)]
Shard = Annotated[str | None, Field(pattern=r"^\d+/\d+$"), AfterValidator(valid_shard)]


class RunSettings(BaseModel):
    """What one run of `process-invoices` is asked to do (its block parameters aside)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Location = BUNDLED_SAMPLES
    output: Location = "out"
    extractor: ExtractorChoice = "auto"
    max_concurrency: Concurrency = 100
    chunk_size: Count = 50
    shard: Shard = None
    invoice_timeout: Seconds = 300.0
    max_pages: Count = 500
    max_bytes: Count = 50 * 1024 * 1024
    max_attempts: Count = 3
    lease_seconds: Seconds = 60.0
    stop_grace_seconds: GraceSeconds = 30.0
    reprocess_needs_review: bool = False
    parse_executor: ParseExecutor = "process"
    fail_on_invoice_errors: bool = True


DEFAULTS = RunSettings()
