"""Credentials the Prefect way: blocks by name, or the environment when no name is given."""

from __future__ import annotations

from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials
from pydantic import SecretStr


async def load_aws_credentials(block_name: str | None) -> AwsCredentials | None:
    """The named `AwsCredentials` block; None means boto's default credential chain."""
    return None if block_name is None else await AwsCredentials.aload(block_name)


async def load_secret(block_name: str | None) -> SecretStr | None:
    """The value of the named `Secret` block, kept wrapped so it never prints."""
    if block_name is None:
        return None
    secret = await Secret.aload(block_name)
    return SecretStr(str(secret.get()))
