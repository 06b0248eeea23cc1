"""Credentials the Prefect way: blocks by name, or the environment when no name is given."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.blocks.system import Secret
from pydantic import SecretStr

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials


async def load_aws_credentials(block_name: str | None) -> AwsCredentials | None:
    """The named `AwsCredentials` block; None means boto's default credential chain."""
    if block_name is None:
        return None
    # Imported here: importing prefect_aws imports its ECS worker too, 0.25-0.45 s of every
    # run's start, which only runs naming a block need.
    from prefect_aws import AwsCredentials

    return await AwsCredentials.aload(block_name)


async def load_secret(block_name: str | None) -> SecretStr | None:
    """The value of the named `Secret` block, kept wrapped so it never prints."""
    if block_name is None:
        return None
    secret = await Secret.aload(block_name)
    return SecretStr(str(secret.get()))
