"""Credentials the Prefect way: blocks, chosen in the run form, or the environment when none is."""

from __future__ import annotations

from typing import Annotated, Any

from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials
from pydantic import GetJsonSchemaHandler, SecretStr
from pydantic_core import CoreSchema


class BlockByReference:
    """Marks a block parameter so that Prefect's server accepts the block named by reference.

    A block parameter may be given as the block's fields or as a reference (`{"$ref":
    {"block_document_id" | "block_document_slug": ...}}`: what the run form's block picker
    and prefect.yaml send). Prefect (3.8 and 3.9) checks a flow run's parameters against
    "the block's schema or a reference, exactly one"; a deployment's, against the block's
    schema alone with `required` left out. A block whose fields are all optional (prefect-aws's
    `AwsCredentials`) lets a reference match both at run time, so the run is refused ("is
    valid under each of"). Requiring a field of the block, as `Secret`'s schema does
    (`value`), makes a reference match only the reference at run time and still pass when
    deploying. tests/test_deployments.py checks both paths on a real server."""

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        json_schema = handler(core_schema)
        definition = handler.resolve_ref_schema(json_schema)
        if not definition.get("required"):
            definition["required"] = [next(iter(definition["properties"]))]
        return json_schema


AwsCredentialsBlock = Annotated[AwsCredentials, BlockByReference]


def secret_value(secret: Secret | None) -> SecretStr | None:
    """The value of a `Secret` block, kept wrapped so it never prints; None without one."""
    if secret is None:
        return None
    return SecretStr(str(secret.get()))
