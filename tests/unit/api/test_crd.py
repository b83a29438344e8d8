"""The generated CRD: structural, described, with subresources and printer columns, and CEL rules that agree
with the Python validation (evaluated with a real CEL interpreter, after applying the schema's defaults the
way the API server does)."""

from __future__ import annotations

import copy
from typing import Any

import cel
import pytest
import yaml

from distillery_operator.api import InvalidSpec, parse_distilled_model
from distillery_operator.crd import SPEC_RULES, build_crd

from .conftest import minimal_dm

FORBIDDEN_IN_STRUCTURAL = {"$ref", "oneOf", "allOf", "not", "definitions", "$defs", "title", "const"}


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return build_crd()


@pytest.fixture(scope="module")
def version(crd):
    return crd["spec"]["versions"][0]


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_described(version):
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert not FORBIDDEN_IN_STRUCTURAL & set(node), f"{path} uses {FORBIDDEN_IN_STRUCTURAL & set(node)}"
        for exclusive in ("exclusiveMinimum", "exclusiveMaximum"):  # OpenAPI v3: booleans, not bounds
            assert isinstance(node.get(exclusive, False), bool), f"{path}.{exclusive} must be a boolean"
        int_or_string = node.get("x-kubernetes-int-or-string")
        assert "type" in node or int_or_string, f"{path} has no type"
        if int_or_string:
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        if node.get("type") == "object" and path != ".metadata":
            assert "properties" in node or "additionalProperties" in node \
                or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} is an object with no fields"
        if path.startswith(".spec") or path.startswith(".status"):
            scalar_item = path.endswith(("[]", "{}")) and node.get("type") != "object"
            assert node.get("description") or scalar_item, f"{path} has no description (kubectl explain)"


def test_names_subresources_and_columns(crd, version):
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == (
        "distillery.dev", "DistilledModel", "distilledmodels", ["dm"])
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas"}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Phase", "URL", "GPU", "Quant", "Min", "Max", "Rollout", "Canary", "Age"]


def test_enums_and_bounds_reach_the_schema(version):
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["quantization"]["properties"]["method"]["enum"] == ["none", "int8", "int4"]
    assert spec["quantization"]["properties"]["groupSize"]["enum"] == [32, 64, 128]
    assert spec["autoscaling"]["properties"]["minReplicas"]["minimum"] == 0
    assert "queueDepth" in spec["autoscaling"]["properties"]["metric"]["enum"]
    assert spec["deploymentMode"]["enum"] == ["Knative", "Standard"]
    assert spec["serving"]["properties"]["sampling"]["properties"]["temperature"]["default"] == 0.6


# ------------------------------------------------------------------------------------------- CEL
def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: defaults fill absent fields of present objects."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(obj[name], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in obj]
    return obj


def failing_cel_rules(spec: dict[str, Any], version) -> list[str]:
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaulted = apply_defaults(copy.deepcopy(spec), spec_schema)
    return [rule["message"] for rule in SPEC_RULES if not cel.evaluate(rule["rule"], {"self": defaulted})]


def test_samples_pass_every_cel_rule(sample_objects, version):
    for name, obj in sample_objects.items():
        assert failing_cel_rules(obj["spec"], version) == [], name


@pytest.mark.parametrize(
    ("spec", "message_fragment"),
    [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "must not be greater"),
        ({"replicas": 2, "autoscaling": {"maxReplicas": 3}}, "not both"),
        ({"deploymentMode": "Standard", "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "cpu"}},
         "scale to zero"),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "memory"}}, "scale to zero"),
        ({"deploymentMode": "Standard", "autoscaling": {"maxReplicas": 2, "metric": "rps"}}, "need Knative"),
        ({"deploymentMode": "Knative", "autoscaling": {"maxReplicas": 2, "metric": "queueDepth"}}, "only in Standard"),
        ({"rollout": {"canaryTrafficPercent": 10}}, "canary"),
        ({"deploymentMode": "Standard", "autoscaling": {"maxReplicas": 2, "metric": "cpu"},
          "rollout": {"canaryTrafficPercent": 10}}, "canary"),
        ({"quantization": {"method": "none", "prequantized": True}}, "prequantized"),
        ({"resources": {"gpu": {"count": 0, "type": "nvidia-l4"}}}, "gpu.count"),
        ({"serving": {"maxModelLen": 1024, "sampling": {"maxTokens": 2000}}}, "maxTokens"),
        ({"model": {"uri": "ftp://x/y"}}, "model.uri"),
        ({"deploymentMode": "Knative", "rollout": {"steps": [10, 50, 50]}}, "strictly increasing"),
        ({"deploymentMode": "Knative", "rollout": {"steps": [50, 10]}}, "strictly increasing"),
        ({"deploymentMode": "Knative", "rollout": {"steps": [10], "canaryTrafficPercent": 10}}, "not both"),
        ({"deploymentMode": "Standard", "rollout": {"steps": [10, 50]}}, "need Knative"),
        ({"rollout": {"steps": [10, 50]}}, "need Knative"),  # Standard by default (no autoscaling)
        ({"deploymentMode": "Knative", "rollout": {"analysis": {"interval": "60s"}}}, "set rollout.steps"),
    ],
)
def test_cel_rules_refuse_what_python_refuses(spec, message_fragment, version):
    obj = minimal_dm(**spec)
    failing = failing_cel_rules(obj["spec"], version)
    assert any(message_fragment in m for m in failing), failing
    with pytest.raises(InvalidSpec):
        parse_distilled_model(obj)


def test_cel_rules_accept_valid_edge_cases(version):
    for spec in (
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 3}},  # Knative by default: scale to zero is fine
        {"deploymentMode": "Standard", "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "metric": "queueDepth"}},
        {"autoscaling": {"maxReplicas": 3}, "rollout": {"canaryTrafficPercent": 20}},
        {"replicas": 3},
        {"deploymentMode": "Knative", "rollout": {"steps": [10, 50, 90]}},
        {"autoscaling": {"maxReplicas": 3}, "rollout": {"steps": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                                                17, 18, 19, 20]}},
    ):
        obj = minimal_dm(**spec)
        parse_distilled_model(obj)
        assert failing_cel_rules(obj["spec"], version) == [], spec


def test_crd_yaml_round_trips(crd):
    assert yaml.safe_load(yaml.safe_dump(crd)) == crd
