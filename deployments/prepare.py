"""Prepare a Prefect server for the invoice pipeline; safe to run again at any time.

    python -m deployments.prepare [--work-pool invoices]
        [--llm-max-in-flight N] [--llm-requests-per-minute N]
        [--aws-credentials-block NAME [--aws-region R] [--aws-endpoint-url URL] ...]
        [--openai-secret-block NAME]

Against the server in PREFECT_API_URL it makes sure of:

- the `process` work pool (default `invoices`) and its queues `on-demand` (priority 1) and
  `scheduled` (priority 2), which prefect.yaml's deployments use;
- the LLM limits `llm-in-flight` and `llm-rate`, shared by every run;
- with `--aws-credentials-block NAME`: a prefect-aws `AwsCredentials` block from the current
  environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
  AWS_REGION or AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) and the flags;
- with `--openai-secret-block NAME`: a `Secret` block holding OPENAI_API_KEY.

Secret values are never printed. Exit codes: 0 prepared; 2 something could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORK_POOL = "invoices"
# The queues prefect.yaml's deployments use: on-demand runs go before scheduled ones when a
# worker has to choose.
WORK_QUEUES = {
    "on-demand": (1, "Runs triggered from the UI, the CLI or CI"),
    "scheduled": (2, "Runs created by deployment schedules (nightly)"),
}


class PrepareError(RuntimeError):
    """Something the server needs could not be set up (the message says what and why)."""


@dataclass
class AwsBlockOptions:
    name: str
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    store_keys: bool = True


def _env(*names: str) -> str | None:
    for name in names:
        if value := os.environ.get(name):
            return value
    return None


async def ensure_work_pool(name: str, say: Callable[[str], None]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
            state = "exists"
        except ObjectNotFound:
            try:
                pool = await client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=ProcessWorker.type,
                        description="Invoice pipeline: flow runs as subprocesses of a worker",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                state = "created"
            except ObjectAlreadyExists:  # created by someone else in between
                pool = await client.read_work_pool(name)
                state = "exists"
        if pool.type != ProcessWorker.type:
            raise PrepareError(
                f"work pool {name!r} exists with type {pool.type!r}, not 'process'; "
                "use another --work-pool name or delete that pool"
            )
        say(f"work pool {name!r} (type process): {state}")

        for queue_name, (priority, description) in WORK_QUEUES.items():
            try:
                queue = await client.read_work_queue_by_name(queue_name, work_pool_name=name)
            except ObjectNotFound:
                await client.create_work_queue(
                    name=queue_name,
                    description=description,
                    priority=priority,
                    work_pool_name=name,
                )
                say(f"  work queue {queue_name!r} (priority {priority}): created")
                continue
            if queue.priority != priority:
                await client.update_work_queue(queue.id, priority=priority)
                say(f"  work queue {queue_name!r}: priority set to {priority}")
            else:
                say(f"  work queue {queue_name!r} (priority {priority}): exists")


async def ensure_limits(
    llm_max_in_flight: int | None,
    llm_requests_per_minute: int | None,
    say: Callable[[str], None],
) -> None:
    from tasks.orchestration.limits import (
        LLM_IN_FLIGHT_LIMIT,
        LLM_RATE_LIMIT,
        LockUnavailableError,
        ensure_llm_limits,
    )

    llm_options = {
        key: value
        for key, value in (
            ("max_in_flight", llm_max_in_flight),
            ("requests_per_minute", llm_requests_per_minute),
        )
        if value is not None
    }
    try:
        # Without flags an existing limit is left as it is (an operator may have tuned it in
        # the UI); with flags it is set to them.
        await ensure_llm_limits(**llm_options, update_existing=bool(llm_options))
    except LockUnavailableError as exc:
        raise PrepareError(str(exc)) from exc
    say(
        f"concurrency limits {LLM_IN_FLIGHT_LIMIT!r} and {LLM_RATE_LIMIT!r}: "
        + (
            f"set ({', '.join(f'{k}={v}' for k, v in llm_options.items())})"
            if llm_options
            else "ok (existing ones left unchanged)"
        )
    )
    say(
        "manifest locks: one per output (limit 'tag:manifest:<output>', 1 slot), made by the "
        "first run writing to that output"
    )


async def ensure_aws_block(options: AwsBlockOptions, say: Callable[[str], None]) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from pydantic import SecretStr

    access_key = _env("AWS_ACCESS_KEY_ID") if options.store_keys else None
    secret_key = _env("AWS_SECRET_ACCESS_KEY") if options.store_keys else None
    if bool(access_key) != bool(secret_key):
        raise PrepareError(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together "
            "(or use --aws-no-keys to leave keys to the worker's default chain)"
        )
    region = options.region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
    endpoint = options.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    profile = options.profile or (None if access_key else _env("AWS_PROFILE"))
    block = AwsCredentials(
        aws_access_key_id=access_key,
        aws_secret_access_key=SecretStr(secret_key) if secret_key else None,
        aws_session_token=_env("AWS_SESSION_TOKEN") if access_key else None,
        profile_name=profile,
        region_name=region,
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )
    await block.asave(options.name, overwrite=True)
    keys = (
        "access keys from the environment"
        if access_key
        else "no keys (the worker's default AWS chain)"
    )
    details = ", ".join(
        part
        for part in (
            keys,
            f"profile {profile}" if profile else "",
            f"region {region}" if region else "",
            f"endpoint {endpoint}" if endpoint else "",
        )
        if part
    )
    say(f"AwsCredentials block {options.name!r}: saved ({details})")


async def ensure_openai_secret(name: str, say: Callable[[str], None]) -> None:
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound
    from pydantic import SecretStr

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        try:
            await Secret.aload(name)
        except (ValueError, ObjectNotFound):
            raise PrepareError(
                f"--openai-secret-block {name}: OPENAI_API_KEY is not set and no Secret block "
                f"{name!r} exists yet"
            ) from None
        say(f"Secret block {name!r}: exists (OPENAI_API_KEY not set, left unchanged)")
        return
    await Secret(value=SecretStr(key)).asave(name, overwrite=True)
    say(f"Secret block {name!r}: saved from OPENAI_API_KEY")


PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
# The flag of this command that creates a block of each type a deployment may reference.
CREATED_BY = {"aws-credentials": "--aws-credentials-block", "secret": "--openai-secret-block"}


def block_references(prefect_yaml: Path = PREFECT_YAML) -> list[tuple[str, str, str]]:
    """(deployment, parameter, block slug `type/name`) of every block a deployment of
    prefect.yaml names in its parameters (`{"$ref": {"block_document_slug": ...}}`)."""
    import yaml

    spec = yaml.safe_load(prefect_yaml.read_text())
    return [
        (deployment["name"], parameter, value["$ref"]["block_document_slug"])
        for deployment in spec.get("deployments", [])
        for parameter, value in (deployment.get("parameters") or {}).items()
        if isinstance(value, dict) and "block_document_slug" in value.get("$ref", {})
    ]


async def check_deployment_blocks(say: Callable[[str], None]) -> list[str]:
    """Say, for each block prefect.yaml's deployments use, whether it exists on the server
    and how to create it if not; returns the missing ones' slugs."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    async with get_client() as client:
        for deployment, parameter, slug in block_references():
            block_type, name = slug.split("/", 1)
            try:
                await client.read_block_document_by_name(name, block_type_slug=block_type)
                say(
                    f"deployment {deployment!r} uses the {block_type} block {name!r} "
                    f"({parameter}): exists"
                )
            except ObjectNotFound:
                missing.append(slug)
                how = (
                    f"create it with `{CREATED_BY[block_type]} {name}`"
                    if block_type in CREATED_BY
                    else "create it in the UI (Blocks)"
                )
                say(
                    f"deployment {deployment!r} uses the {block_type} block {name!r} "
                    f"({parameter}), which does not exist: {how}; its runs fail until it does"
                )
    return missing


async def prepare(
    *,
    work_pool: str = DEFAULT_WORK_POOL,
    llm_max_in_flight: int | None = None,
    llm_requests_per_minute: int | None = None,
    aws: AwsBlockOptions | None = None,
    openai_secret_block: str | None = None,
    say: Callable[[str], None] = print,
) -> None:
    await ensure_work_pool(work_pool, say)
    await ensure_limits(llm_max_in_flight, llm_requests_per_minute, say)
    if aws is not None:
        await ensure_aws_block(aws, say)
    if openai_secret_block:
        await ensure_openai_secret(openai_secret_block, say)
    await check_deployment_blocks(say)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--work-pool",
        default=DEFAULT_WORK_POOL,
        help=f"name of the process work pool (default {DEFAULT_WORK_POOL!r}; "
        "prefect.yaml uses this name)",
    )
    parser.add_argument(
        "--llm-max-in-flight",
        type=int,
        default=None,
        help="LLM calls in flight across all runs; given: set, even on an existing "
        "limit; omitted: created with the pipeline's default, an existing one kept",
    )
    parser.add_argument(
        "--llm-requests-per-minute",
        type=int,
        default=None,
        help="LLM requests per minute across all runs (same rule)",
    )
    aws = parser.add_argument_group("AWS credentials block")
    aws.add_argument(
        "--aws-credentials-block",
        metavar="NAME",
        help="save an AwsCredentials block NAME from the environment and these flags "
        "(prefect.yaml's nightly deployment uses 'invoices-aws')",
    )
    aws.add_argument("--aws-region", help="region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    aws.add_argument(
        "--aws-endpoint-url",
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)",
    )
    aws.add_argument(
        "--aws-profile", help="profile name (default: AWS_PROFILE when no keys are set)"
    )
    aws.add_argument(
        "--aws-no-keys",
        action="store_true",
        help="do not store access keys even if set: the worker's default chain provides them",
    )
    parser.add_argument(
        "--openai-secret-block",
        metavar="NAME",
        help="save OPENAI_API_KEY as a Secret block NAME "
        "(prefect.yaml's nightly deployment uses 'openai-api-key')",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        print(
            "PREFECT_API_URL is not set: point it at the server to prepare "
            "(e.g. http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        return 2
    print(f"preparing the Prefect server at {api_url}")
    aws = None
    if args.aws_credentials_block:
        aws = AwsBlockOptions(
            name=args.aws_credentials_block,
            region=args.aws_region,
            endpoint_url=args.aws_endpoint_url,
            profile=args.aws_profile,
            store_keys=not args.aws_no_keys,
        )
    try:
        asyncio.run(
            prepare(
                work_pool=args.work_pool,
                llm_max_in_flight=args.llm_max_in_flight,
                llm_requests_per_minute=args.llm_requests_per_minute,
                aws=aws,
                openai_secret_block=args.openai_secret_block,
            )
        )
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. the server is unreachable: say so, no traceback wall
        print(
            f"error: could not prepare the server at {api_url}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    print(
        "ready: now `prefect --no-prompt deploy --all` from the project root, "
        f"then `prefect worker start --pool {args.work_pool}`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
