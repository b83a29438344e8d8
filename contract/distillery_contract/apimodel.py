"""The base of every API model (DistilledModel, DistillationJob): camelCase on the wire, snake_case in
Python, unknown fields refused (a typo must not pass silently)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base: camelCase on the wire, unknown fields refused (typos must not pass silently)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
