"""The OpenAPI document of routes that read raw bodies: FastAPI cannot derive their request schemas, so
the routes point at components filled from the pydantic request models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


def document_request_bodies(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Put the request models' JSON schemas into the app's OpenAPI components, where the routes'
    `openapi_extra` request bodies point: the routes read raw bodies (request_decoding) so FastAPI
    cannot derive them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for cls in models:
                described = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[cls.__name__] = described
        document: dict[str, Any] = app.openapi_schema or {}
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def request_body(cls: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
