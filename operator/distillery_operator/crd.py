"""Generate the DistilledModel and DistillationJob CustomResourceDefinitions from the pydantic API models.

The pydantic JSON schema is turned into a structural OpenAPI v3 schema: $refs inlined, Optional[X]
collapsed to X, enums and bounds kept, descriptions on every field (so `kubectl explain` works), and the
cross-field rules that matter most repeated as CEL `x-kubernetes-validations`, so `kubectl apply` refuses
them before the operator ever sees the object. Status and scale subresources and printer columns too.
"""

from __future__ import annotations

import copy
from typing import Any

from distillery_contract.distillation import DistillationJobSpec

from . import constants
from .api import DistilledModelSpec, DistilledModelStatus
from .distillation_api import DistillationJobStatus

# JSON-schema keywords that a structural CRD schema may carry (others, like title or const, are dropped).
_KEEP = {
    "type", "description", "properties", "items", "required", "enum", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "additionalProperties", "default", "format", "nullable",
}

# Cross-field rules on spec (CEL). Each mirrors a rule in api.semantic_problems, with the same reason.
SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas",
        "message": "autoscaling.minReplicas must not be greater than autoscaling.maxReplicas",
        "fieldPath": ".autoscaling.minReplicas",
    },
    {
        "rule": "!has(self.autoscaling) || !has(self.replicas)",
        "message": "set either replicas (a fixed count) or autoscaling, not both",
        "fieldPath": ".replicas",
    },
    {
        "rule": (
            "!has(self.autoscaling) || self.autoscaling.minReplicas > 0 || "
            "(has(self.autoscaling.metric) && self.autoscaling.metric in ['queueDepth', 'gpuUtilization']) || "
            "((!has(self.deploymentMode) || self.deploymentMode == 'Knative') && "
            "(!has(self.autoscaling.metric) || self.autoscaling.metric in ['concurrency', 'rps']))"
        ),
        "message": "scale to zero (minReplicas 0) needs Knative with concurrency/rps, or KEDA with queueDepth/gpuUtilization",
        "fieldPath": ".autoscaling.minReplicas",
    },
    {
        "rule": (
            "!has(self.autoscaling) || !has(self.autoscaling.metric) || "
            "!(self.autoscaling.metric in ['concurrency', 'rps']) || "
            "!has(self.deploymentMode) || self.deploymentMode == 'Knative'"
        ),
        "message": "concurrency and rps autoscaling need Knative's autoscaler (deploymentMode Knative)",
        "fieldPath": ".autoscaling.metric",
    },
    {
        "rule": (
            "!has(self.autoscaling) || !has(self.autoscaling.metric) || "
            "!(self.autoscaling.metric in ['queueDepth', 'gpuUtilization']) || "
            "!has(self.deploymentMode) || self.deploymentMode == 'Standard'"
        ),
        "message": "queueDepth and gpuUtilization scale through KEDA, which KServe supports only in Standard mode",
        "fieldPath": ".autoscaling.metric",
    },
    {
        "rule": (
            "!has(self.rollout) || !has(self.rollout.canaryTrafficPercent) || "
            "(has(self.deploymentMode) && self.deploymentMode == 'Knative') || "
            "(!has(self.deploymentMode) && has(self.autoscaling) && "
            "(!has(self.autoscaling.metric) || self.autoscaling.metric in ['concurrency', 'rps']))"
        ),
        "message": "canary rollouts need Knative mode",
        "fieldPath": ".rollout.canaryTrafficPercent",
    },
    {
        "rule": (
            # steps has at most 20 items (maxItems): compare each neighbouring pair by index
            "!has(self.rollout) || !has(self.rollout.steps) || "
            "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19].all(k, "
            "k >= size(self.rollout.steps) || self.rollout.steps[k - 1] < self.rollout.steps[k])"
        ),
        "message": "rollout.steps must be strictly increasing",
        "fieldPath": ".rollout.steps",
    },
    {
        "rule": "!has(self.rollout) || !has(self.rollout.steps) || !has(self.rollout.canaryTrafficPercent)",
        "message": "set either rollout.canaryTrafficPercent (manual) or rollout.steps, not both",
        "fieldPath": ".rollout.steps",
    },
    {
        "rule": (
            "!has(self.rollout) || !has(self.rollout.steps) || "
            "(has(self.deploymentMode) && self.deploymentMode == 'Knative') || "
            "(!has(self.deploymentMode) && has(self.autoscaling) && "
            "(!has(self.autoscaling.metric) || self.autoscaling.metric in ['concurrency', 'rps']))"
        ),
        "message": "stepped rollouts need Knative mode",
        "fieldPath": ".rollout.steps",
    },
    {
        "rule": "!has(self.rollout) || !has(self.rollout.analysis) || has(self.rollout.steps)",
        "message": "rollout.analysis judges rollout steps: set rollout.steps",
        "fieldPath": ".rollout.analysis",
    },
    {
        "rule": "!has(self.quantization) || !self.quantization.prequantized || self.quantization.method != 'none'",
        "message": "prequantized weights need quantization method int8 or int4",
        "fieldPath": ".quantization.prequantized",
    },
    {
        "rule": "!has(self.resources) || !has(self.resources.gpu) || !has(self.resources.gpu.type) || self.resources.gpu.count >= 1",
        "message": "a GPU type needs gpu.count >= 1",
        "fieldPath": ".resources.gpu.count",
    },
    {
        "rule": (
            "!has(self.serving) || !has(self.serving.sampling) || "
            "self.serving.sampling.maxTokens <= self.serving.maxModelLen"
        ),
        "message": "serving.sampling.maxTokens must not exceed serving.maxModelLen",
        "fieldPath": ".serving.sampling.maxTokens",
    },
    {
        "rule": "self.model.uri.matches('^(hf|s3|gs|pvc|oci|https)://.+')",
        "message": "model.uri must start with hf://, s3://, gs://, pvc://, oci:// or https://",
        "fieldPath": ".model.uri",
    },
]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url"},
    {"name": "GPU", "type": "string", "jsonPath": ".status.gpu"},
    {"name": "Quant", "type": "string", "jsonPath": ".status.quantization"},
    {"name": "Min", "type": "integer", "jsonPath": ".spec.autoscaling.minReplicas"},
    {"name": "Max", "type": "integer", "jsonPath": ".spec.autoscaling.maxReplicas"},
    {"name": "Rollout", "type": "string", "jsonPath": ".status.rollout.phase", "priority": 1},
    {"name": "Canary", "type": "integer", "jsonPath": ".status.rollout.trafficPercent", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = {**copy.deepcopy(target), **node}  # the referring field's description/default win
        return _structural(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) == 1:  # Optional[X] -> X; quantities are X with x-kubernetes-int-or-string
            merged = {**branches[0], **node}
            return _structural(merged, defs)
        raise ValueError(f"cannot express anyOf {branches} structurally")
    if "const" in node and "enum" not in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    # JSON Schema 2020 writes exclusive bounds as numbers; OpenAPI v3 (what CRDs speak) as booleans.
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), int | float) and not isinstance(out[exclusive], bool):
            out[bound] = out.pop(exclusive)
            out[exclusive] = True
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs)
        else:
            out.pop("additionalProperties", None)
    if node.get("type") == "array" and "items" in node:
        out["items"] = _structural(node["items"], defs)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("pattern", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out["x-kubernetes-int-or-string"] = True
    if isinstance(out.get("default"), dict | list):
        out.pop("default")  # object defaults come from the leaves; keeps `kubectl get -o yaml` honest
    if out.get("default") is None:
        out.pop("default", None)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def model_schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _require_descriptions(schema: dict[str, Any], path: str = "spec") -> None:
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            raise ValueError(f"{path}.{name} has no description: add Field(description=...) in api.py")
        _require_descriptions(prop, f"{path}.{name}")
        if "items" in prop:
            _require_descriptions(prop["items"], f"{path}.{name}[]")


# Cross-field rules of a DistillationJob's spec, each mirroring one of distillery_contract.distillation.spec_problems
# (or distillation_api.operator_problems) with the same reason.
DJ_SPEC_RULES: list[dict[str, str]] = [
    {
        "rule": "!has(self.lora) || (has(self.method) && self.method == 'lora')",
        "message": "lora settings apply only to method lora",
        "fieldPath": ".lora",
    },
    {
        "rule": "self.teacher.uri != self.student.uri || "
                "(has(self.teacher.revision) ? self.teacher.revision : '') != "
                "(has(self.student.revision) ? self.student.revision : '')",
        "message": "the student is the teacher: distil into a different model",
        "fieldPath": ".student.uri",
    },
    {
        "rule": "!has(self.resources) || !has(self.resources.hardwareProfile) || "
                "self.resources.hardwareProfile != 'cpu' || self.resources.gpusPerNode == 0",
        "message": "hardwareProfile cpu has no GPU: set gpusPerNode 0",
        "fieldPath": ".resources.gpusPerNode",
    },
    {
        "rule": "!has(self.resources) || !has(self.resources.hardwareProfile) || "
                "self.resources.hardwareProfile == 'cpu' || self.resources.gpusPerNode >= 1",
        "message": "a GPU hardwareProfile needs gpusPerNode >= 1",
        "fieldPath": ".resources.gpusPerNode",
    },
    {
        "rule": "!has(self.training) || !has(self.training.precision) || self.training.precision != 'bf16' || "
                "!has(self.resources) || !has(self.resources.hardwareProfile) || self.resources.hardwareProfile != 't4'",
        "message": "t4 has no bfloat16: use fp16 or auto",
        "fieldPath": ".training.precision",
    },
] + [
    {
        "rule": f"self.{field}.uri.matches('^(hf|s3|gs|pvc)://.*[^/].*')",
        "message": f"{field}.uri must start with hf://, s3://, gs:// or pvc:// and name a location",
        "fieldPath": f".{field}.uri",
    }
    for field in ("teacher", "student", "dataset", "output")
] + [
    {
        "rule": f"!has(self.{field}.revision) || self.{field}.uri.startsWith('hf://')",
        "message": "revision applies only to hf:// sources",
        "fieldPath": f".{field}.revision",
    }
    for field in ("teacher", "student")
]

DJ_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Teacher", "type": "string", "jsonPath": ".spec.teacher.uri"},
    {"name": "Student", "type": "string", "jsonPath": ".spec.student.uri"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _build(
    *, kind: str, plural: str, singular: str, short_names: tuple[str, ...], description: str,
    spec_model: type[Any], status_model: type[Any], rules: list[dict[str, str]], columns: list[dict[str, Any]],
    subresources: dict[str, Any],
) -> dict[str, Any]:
    spec_schema = model_schema(spec_model)
    spec_schema["description"] = spec_model.__doc__
    spec_schema["x-kubernetes-validations"] = rules
    _require_descriptions(spec_schema)
    status_schema = model_schema(status_model)
    status_schema["description"] = status_model.__doc__
    status_schema["x-kubernetes-preserve-unknown-fields"] = True  # kopf's own bookkeeping lives here too
    schema = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object"},
            "kind": {"type": "string", "description": f"Kind of this object ({kind})"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{constants.GROUP}",
            "labels": {constants.LABEL_PART_OF: constants.PART_OF},
        },
        "spec": {
            "group": constants.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": list(constants.CATEGORIES),
            },
            "versions": [
                {
                    "name": constants.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def build_crd() -> dict[str, Any]:
    """The DistilledModel CRD (apiextensions.k8s.io/v1)."""
    return _build(
        kind=constants.KIND, plural=constants.PLURAL, singular=constants.SINGULAR, short_names=constants.SHORT_NAMES,
        description="A distilled, quantized LLM served by KServe through Distillery's runtime.",
        spec_model=DistilledModelSpec, status_model=DistilledModelStatus, rules=SPEC_RULES, columns=PRINTER_COLUMNS,
        subresources={
            "status": {},
            "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"},
        },
    )


def build_distillation_crd() -> dict[str, Any]:
    """The DistillationJob CRD (apiextensions.k8s.io/v1)."""
    return _build(
        kind=constants.DJ_KIND, plural=constants.DJ_PLURAL, singular=constants.DJ_SINGULAR,
        short_names=constants.DJ_SHORT_NAMES,
        description="Teacher -> student knowledge distillation on Kubeflow Trainer, handed to a DistilledModel.",
        spec_model=DistillationJobSpec, status_model=DistillationJobStatus, rules=DJ_SPEC_RULES,
        columns=DJ_PRINTER_COLUMNS, subresources={"status": {}},
    )
