"""One definition of a run's parameters (flows/settings.py): the flow's signature, what
`prefect deploy` reads from its source, prefect.yaml and `invoices run` all agree with it."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.callables import (
    parameter_docstrings,
    parameter_schema,
    parameter_schema_from_entrypoint,
)
from pydantic import ValidationError

from flows.cli import RUN_OPTIONS, add_run_options, check_parameters
from flows.process_invoices import process_invoices
from flows.settings import DEFAULTS, RunSettings

ROOT = Path(__file__).resolve().parents[1]
BLOCK_PARAMETERS = {"aws_credentials", "openai_api_key"}


def comparable(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's type, bounds and default, without what only labels it."""
    return {
        key: value
        for key, value in schema.items()
        if key not in ("title", "position", "description")
    }


@pytest.mark.parametrize("how", ["imported", "from source (prefect deploy)"])
def test_the_flow_signature_is_the_settings_model(how: str) -> None:
    if how == "imported":
        schema = parameter_schema(process_invoices.fn)
    else:
        schema = parameter_schema_from_entrypoint(
            str(ROOT / "flows" / "process_invoices.py") + ":process_invoices"
        )
    settings = RunSettings.model_json_schema()["properties"]
    assert set(schema.properties) == set(settings) | BLOCK_PARAMETERS
    for name, expected in settings.items():
        assert comparable(schema.properties[name]) == comparable(expected), name


def test_every_parameter_is_described_for_the_run_form() -> None:
    described = parameter_docstrings(inspect.getdoc(process_invoices.fn))
    assert set(described) == set(RunSettings.model_fields) | BLOCK_PARAMETERS


def test_prefect_yaml_parameters_are_valid_settings() -> None:
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        parameters = {
            name: value
            for name, value in deployment["parameters"].items()
            if name not in BLOCK_PARAMETERS
        }
        RunSettings.model_validate(parameters)  # raises, naming the field, if one is wrong


def test_the_cli_options_are_settings_with_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    args = parser.parse_args([])
    assert set(RUN_OPTIONS) <= set(RunSettings.model_fields)
    assert {name: getattr(args, name) for name in RUN_OPTIONS} == DEFAULTS.model_dump(
        include=set(RUN_OPTIONS)
    )


def test_bad_values_are_refused_by_the_model_and_named_by_option() -> None:
    with pytest.raises(ValidationError):
        RunSettings(max_concurrency=0)
    with pytest.raises(ValidationError):
        RunSettings(shard="3/2")
    with pytest.raises(ValidationError):
        RunSettings(unknown=1)  # type: ignore[call-arg]
    problems = check_parameters({"max_concurrency": 0, "shard": "5/4"})
    assert [problem.split(" ")[0] for problem in problems] == ["--max-concurrency", "--shard"]
