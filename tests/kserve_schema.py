"""Validate objects against a CRD's openAPIV3Schema, strictly (shared by the renderer and chart tests).

The KServe CRDs in third_party/reference/kserve-v0.20.0/ carry no `additionalProperties: false`, so a
misspelled field would pass plain validation (the API server prunes it silently instead). We inject
`additionalProperties: false` into every object schema that lists its properties and does not
preserve unknown fields, and map OpenAPI's `nullable` and `x-kubernetes-int-or-string` (and RE2's
`^(?i)` patterns) onto JSON Schema, so a typo fails the test with its path.

Usage (pyproject sets pytest's pythonpath to the repo root, so `tests` imports as a namespace package):
    from tests.kserve_schema import assert_valid, kserve_validator
    validator = kserve_validator(kserve_reference_dir / "serving.kserve.io_inferenceservices.yaml")
    assert_valid(validator, isvc_dict)
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_SCHEMA_KEYS_WITH_SUBSCHEMA = ("items", "additionalProperties", "not")
_SCHEMA_KEYS_WITH_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 (Kubernetes structural) schema made strict for jsonschema."""
    schema = copy.deepcopy(schema)
    _strict_in_place(schema)
    return schema


def _strict_in_place(node: dict[str, Any]) -> None:
    props = node.get("properties")
    if isinstance(props, dict):
        for sub in props.values():
            _strict_in_place(sub)
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in _SCHEMA_KEYS_WITH_SUBSCHEMA:
        sub = node.get(key)
        if isinstance(sub, dict):
            _strict_in_place(sub)
    for key in _SCHEMA_KEYS_WITH_SUBSCHEMA_LISTS:
        for sub in node.get(key, []) or []:
            _strict_in_place(sub)
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    pattern = node.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        # Go's RE2 takes a flag group anywhere (prometheus-operator writes ^(?i)...); Python only at the start
        node["pattern"] = "(?i)^" + pattern[len("^(?i)"):]


def crd_schema(crd: dict[str, Any], version: str | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of one version of a CRD (the storage version when none is named)."""
    versions = crd["spec"]["versions"]
    if version is None:
        chosen = next((v for v in versions if v.get("storage")), versions[0])
    else:
        matches = [v for v in versions if v["name"] == version]
        if not matches:
            raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r}")
        chosen = matches[0]
    return chosen["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=16)
def _load_crd(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        # The KServe CRDs are megabytes of YAML: libyaml's loader is ~10x faster than the pure-Python one.
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def kserve_validator(crd_path: str | Path, version: str | None = None) -> jsonschema.protocols.Validator:
    """A strict jsonschema validator for the objects a CRD file (e.g. KServe's) defines (built once per file)."""
    return _validator(str(crd_path), version)


@lru_cache(maxsize=16)
def _validator(crd_path: str, version: str | None) -> jsonschema.protocols.Validator:
    schema = strict_schema(crd_schema(_load_crd(crd_path), version))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    # The injected schema checked against a meta-schema: Draft 7's, whose keywords are every one a CRD's structural
    # (OpenAPI v3) schema uses; 2020-12's dynamic references made the same check of KServe's InferenceService take
    # ~17 s of the suite, Draft 7's ~2 s.
    jsonschema.Draft7Validator.check_schema(schema)
    return cls(schema)


def assert_valid(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> None:
    """Fail with every schema error, each with the JSON path of the offending field."""
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  {e.json_path}: {e.message[:300]}" for e in errors]
        name = obj.get("metadata", {}).get("name", "?") if isinstance(obj, dict) else "?"
        raise AssertionError(f"{obj.get('kind', '?')}/{name} is invalid:\n" + "\n".join(lines))
