"""The DistilledModel API (distillery.dev/v1alpha1): pydantic models that are the single source of truth.

The CRD's OpenAPI schema (crd.py), the defaults, the validation the operator and the CLI apply, and the
renderer's input all come from these classes. Field names are snake_case in Python and camelCase on the
wire (aliases). `parse_distilled_model` turns a Kubernetes object into a validated `DistilledModel` or
raises `InvalidSpec` listing every problem with the field it concerns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from distillery_contract import flags
from distillery_contract.apimodel import ApiModel
from distillery_contract.values import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    Architecture,
    Dtype,
    GroupSize,
    HardwareProfile,
    QuantMethod,
    WeightFormat,
)

from . import constants


def _quantity_to_str(value: object) -> object:
    # YAML reads `cpu: 4` as an int; Kubernetes quantities are int-or-string.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(pattern=QUANTITY_PATTERN, json_schema_extra={"x-kubernetes-int-or-string": True}),
]


# --------------------------------------------------------------------------------------------- model
URI_SCHEMES = ("hf", "s3", "gs", "pvc", "oci", "https")


class ModelSource(ApiModel):
    """Where the distilled weights come from and what they are."""

    uri: str = Field(
        description=(
            "Location of the weights, fetched by KServe's storage initializer: hf://ORG/REPO, s3://, gs://, "
            "pvc://CLAIM/PATH, oci://, https://"
        ),
        min_length=1,
        max_length=2048,
    )
    format: WeightFormat = Field(
        WeightFormat.SAFETENSORS,
        description="Weight file format: a Hugging Face safetensors checkpoint or a single GGUF file",
    )
    revision: str | None = Field(None, description="Revision (branch, tag or commit) for hf:// sources", max_length=256)
    teacher: str | None = Field(
        None, description='Free-text lineage: the teacher model this student was distilled from, e.g. "DeepSeek-R1"'
    )
    architecture: Architecture | None = Field(
        None, description="Architecture hint (qwen2: R1-Distill-Qwen, llama: R1-Distill-Llama); read from the weights when empty"
    )


# ------------------------------------------------------------------------------------- quantization
class Quantization(ApiModel):
    """Weight-only quantization of the decoder's linear layers."""

    method: QuantMethod = Field(
        QuantMethod.NONE,
        description="none: serve in the checkpoint's dtype; int8: per-channel weight-only; int4: group-wise weight-only",
    )
    group_size: GroupSize = Field(DEFAULT_GROUP_SIZE, description="int4 group size (input channels per scale)")
    prequantized: bool = Field(
        False, description="The weights are already in Distillery's quantized format (from model-runtime quantize)"
    )


# ------------------------------------------------------------------------------------------ serving
class Sampling(ApiModel):
    """Default sampling parameters, used when a request does not set them (R1 recommends 0.6 / 0.95)."""

    temperature: float = Field(0.6, ge=0.0, le=2.0, description="Default sampling temperature (0: greedy)")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Default nucleus sampling probability mass")
    max_tokens: int = Field(2048, ge=1, le=1_048_576, description="Default cap on generated tokens per request")


class Reasoning(ApiModel):
    """DeepSeek-R1 reasoning conventions."""

    think_prefix: bool = Field(True, description='Force every answer to start with "<think>\\n" (R1 may skip thinking otherwise)')
    separate_reasoning: bool = Field(
        True, description="Return the text inside <think>...</think> as reasoning_content (DeepSeek API style)"
    )


class ResponseCache(ApiModel):
    """An exact-match cache of answers to deterministic OpenAI requests, in each replica's memory.

    Only requests that cannot sample differently use it: temperature 0 (after the defaults above) or a fixed
    seed, not streamed. A client skips it with `Cache-Control: no-cache` (no-store: nor stored); the answer's
    `x-distillery-cache` header says hit, miss or bypass. Shared by every client of the model.
    """

    enabled: bool = Field(False, description="Answer repeated deterministic requests from the cache")
    max_entries: int = Field(
        1000, ge=1, le=1_000_000, description="Answers kept per replica at most (the least recently used go first)"
    )
    ttl_seconds: int = Field(600, ge=1, le=86_400, description="Seconds a cached answer is served (at most a day)")


class EnvVar(ApiModel):
    """An environment variable for the runtime container."""

    name: str = Field(description="Variable name", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$", max_length=256)
    value: str = Field("", description="Variable value")


class Serving(ApiModel):
    """How the runtime serves the model."""

    max_model_len: int = Field(4096, ge=128, le=1_048_576, description="Context length (prompt + generated tokens)")
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024, description="Sequences decoded together (continuous batching)")
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=1, le=100_000, description="Requests waiting for a batch slot before 429s")
    dtype: Dtype = Field(
        "auto", description="Activation dtype (auto: bfloat16 on CPU and recent GPUs, float16 on GPUs without bf16)"
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Default sampling parameters")
    reasoning: Reasoning = Field(default_factory=Reasoning, description="DeepSeek-R1 reasoning conventions")
    response_cache: ResponseCache = Field(
        default_factory=ResponseCache,
        description="Exact-match cache of answers to deterministic requests (temperature 0 or a seed); off by default",
    )
    args: list[str] = Field(default_factory=list, description="Extra command-line arguments for the runtime")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables for the runtime")


# ---------------------------------------------------------------------------------------- resources
class Gpu(ApiModel):
    """GPUs for the model server."""

    count: int = Field(1, ge=0, le=16, description="GPUs per replica")
    type: str | None = Field(
        None,
        description="GPU type, the value of the node label that names it, e.g. nvidia-tesla-t4, nvidia-l4, nvidia-a100-80gb, nvidia-h100-80gb",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=63,
    )
    resource_name: str = Field(
        constants.DEFAULT_GPU_RESOURCE, description="Extended resource name of the device plugin", min_length=1
    )


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(None, description="Taint key the toleration applies to")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal")
    value: str | None = Field(None, description="Taint value to match (operator Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated")


class Resources(ApiModel):
    """Compute resources and placement of each replica; a hardware profile fills in what is left empty."""

    gpu: Gpu | None = Field(None, description="GPU request; empty: CPU only (or what the hardware profile sets)")
    cpu: Quantity | None = Field(None, description="CPU request and limit, e.g. 4 or 3500m")
    memory: Quantity | None = Field(None, description="Memory request and limit, e.g. 16Gi")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations")
    priority_class_name: str | None = Field(None, description="PriorityClass of the model server pods")


# -------------------------------------------------------------------------------------- autoscaling
class ScaleMetric(StrEnum):
    CONCURRENCY = "concurrency"
    RPS = "rps"
    CPU = "cpu"
    MEMORY = "memory"
    QUEUE_DEPTH = "queueDepth"
    GPU_UTILIZATION = "gpuUtilization"


class DeploymentMode(StrEnum):
    KNATIVE = "Knative"
    STANDARD = "Standard"


# Which autoscaler serves which metric (KServe's admission rules).
KNATIVE_KPA_METRICS = frozenset({ScaleMetric.CONCURRENCY, ScaleMetric.RPS})
HPA_METRICS = frozenset({ScaleMetric.CPU, ScaleMetric.MEMORY})
KEDA_METRICS = frozenset({ScaleMetric.QUEUE_DEPTH, ScaleMetric.GPU_UTILIZATION})

DEFAULT_TARGETS: dict[ScaleMetric, int] = {
    ScaleMetric.CONCURRENCY: 8,
    ScaleMetric.RPS: 10,
    ScaleMetric.CPU: 80,
    ScaleMetric.MEMORY: 80,
    ScaleMetric.QUEUE_DEPTH: 4,
    ScaleMetric.GPU_UTILIZATION: 80,
}


class Autoscaling(ApiModel):
    """Replica autoscaling. concurrency/rps use Knative's KPA, cpu/memory an HPA, queueDepth/gpuUtilization KEDA."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 scales to zero when idle")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas")
    metric: ScaleMetric | None = Field(
        None,
        description=(
            "Scaling metric: concurrency or rps (Knative), cpu or memory (HPA, utilization %), queueDepth or "
            "gpuUtilization (KEDA on Prometheus); default concurrency (Knative) or cpu (Standard)"
        ),
    )
    target: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Target per replica: in-flight requests, requests/s, utilization %, or queued requests",
    )
    scale_down_delay_seconds: int | None = Field(
        None, ge=0, le=3600, description="Wait this long after load drops before removing replicas"
    )


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """Seconds of a Go-style duration string (120s, 2m, 1m30s, 500ms)."""
    return sum(float(value) * _DURATION_UNITS[unit] for value, unit in _DURATION_PART.findall(text))


class Scorer(StrEnum):
    BOXED = "boxed"
    EXACT = "exact"
    CONTAINS = "contains"


class EvaluationDataset(ApiModel):
    """The benchmark the candidate is scored on: JSON lines of {"prompt" or "messages", "answer"}."""

    uri: str = Field(description="Location of the dataset file, e.g. pvc://evals/gsm8k-sample.jsonl", min_length=1,
                     max_length=2048)


class Evaluation(ApiModel):
    """Accuracy gate, run against the candidate (and the stable revision) before any traffic moves."""

    dataset: EvaluationDataset = Field(description="The benchmark dataset")
    scorer: Scorer = Field(Scorer.BOXED, description="boxed: the answer in the last \\boxed{} (R1 math); exact; contains")
    limit: int = Field(200, ge=1, le=100_000, description="Examples scored per repeat")
    repeats: int = Field(3, ge=1, le=20, description="Runs over the dataset; the gate judges their mean")
    min_score: float | None = Field(None, ge=0.0, le=1.0, description="Lowest mean score the candidate may have")
    max_regression: float | None = Field(
        None, ge=0.0, le=1.0, description="Largest drop of the mean score vs the stable revision, measured in the same run"
    )


class Slo(ApiModel):
    """What each step is judged on, over its interval, on the candidate revision's own pods."""

    p99_latency_seconds: float | None = Field(None, gt=0, description="Highest P99 request latency (seconds)")
    max_error_rate: float | None = Field(None, ge=0.0, le=1.0, description="Highest share of 5xx answers (0..1)")
    min_tokens_per_second: float | None = Field(None, ge=0, description="Lowest generated tokens per second")


class Analysis(ApiModel):
    """How each rollout step is judged (needs the operator's Prometheus: rollouts.analysis.enabled in the chart)."""

    interval: str = Field("120s", pattern=DURATION_PATTERN, description="How long each step runs before it is judged")
    slo: Slo = Field(default_factory=Slo, description="Service level objectives of the candidate")
    evaluation: Evaluation | None = Field(None, description="Optional accuracy gate, run before any traffic moves")


class Rollout(ApiModel):
    """Rollout of spec changes: by hand (canaryTrafficPercent) or in steps, judged and rolled back automatically."""

    canary_traffic_percent: int | None = Field(
        None, ge=0, le=100, description="Percent of traffic sent to the new revision (Knative mode only; manual mode)"
    )
    steps: list[Annotated[int, Field(ge=1, le=99)]] | None = Field(
        None, min_length=1, max_length=20,
        description="Traffic % to the new revision, increasing, in order; promoted after the last (Knative mode)",
    )
    analysis: Analysis | None = Field(
        None, description="How each step is judged; without it each step advances after 120s"
    )


# ------------------------------------------------------------------------------------------ spec
class DistilledModelSpec(ApiModel):
    """Desired state of a distilled LLM deployment."""

    model: ModelSource = Field(description="The distilled weights")
    quantization: Quantization = Field(default_factory=Quantization, description="Weight-only quantization")
    serving: Serving = Field(default_factory=Serving, description="Runtime serving options")
    hardware_profile: HardwareProfile | None = Field(
        None, description="Preset for resources (cpu, t4, l4, a10g, rtx4090, a100-40gb, a100-80gb, h100); explicit resources win"
    )
    resources: Resources = Field(default_factory=Resources, description="Compute resources and placement")
    autoscaling: Autoscaling | None = Field(None, description="Autoscaling; empty: a fixed replica count (spec.replicas)")
    deployment_mode: DeploymentMode | None = Field(
        None,
        description="KServe deployment mode; empty: Knative for concurrency/rps or scale to zero, otherwise Standard",
    )
    replicas: int | None = Field(
        None, ge=1, le=1000, description="Fixed replica count when autoscaling is off (kubectl scale sets it)"
    )
    rollout: Rollout = Field(default_factory=Rollout, description="Rollout of spec changes")
    startup_timeout_seconds: int = Field(
        900, ge=30, le=14_400, description="How long the model may take to download and load before it counts as failed"
    )
    service_account_name: str | None = Field(
        None, description="ServiceAccount of the model server (gives KServe's storage initializer bucket credentials)"
    )


# ---------------------------------------------------------------------------------------- status
class Phase(StrEnum):
    PENDING = "Pending"
    DEPLOYING = "Deploying"
    READY = "Ready"
    FAILED = "Failed"
    DEGRADED = "Degraded"


class Condition(ApiModel):
    """A status condition (Kubernetes conventions)."""

    type: str = Field(description="Validated, InferenceServiceReady or Ready")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str | None = Field(None, description="One-word CamelCase reason")
    message: str | None = Field(None, description="Human-readable details")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339)")
    observed_generation: int | None = Field(None, description="The generation this condition was computed from")


class RolloutPhase(StrEnum):
    IDLE = "Idle"
    EVALUATING = "Evaluating"
    PROGRESSING = "Progressing"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"


class AnalysisResult(ApiModel):
    """The last judgement of the candidate: what was measured, and why it passed or failed."""

    time: str | None = Field(None, description="When it was judged (RFC 3339)")
    p99_latency_seconds: float | None = Field(None, description="Candidate's P99 latency over the step (seconds)")
    error_rate: float | None = Field(None, description="Candidate's 5xx share over the step")
    tokens_per_second: float | None = Field(None, description="Candidate's generated tokens per second")
    score: float | None = Field(None, description="Candidate's mean evaluation score")
    score_std_dev: float | None = Field(None, description="Standard deviation of the score over the repeats")
    stable_score: float | None = Field(None, description="Stable revision's mean score in the same run")
    passed: bool | None = Field(None, description="Whether the gate passed")
    gate: str | None = Field(None, description="Which gate was judged: evaluation, slo or timer")
    reasons: list[str] = Field(default_factory=list, description="Why it failed (each gate with its numbers)")


class RolloutStatus(ApiModel):
    """Where the stepped rollout of the served model stands (status.rollout)."""

    model_config = ConfigDict(extra="allow")

    phase: RolloutPhase | None = Field(None, description="Idle, Evaluating, Progressing, Promoted or RolledBack")
    step: int | None = Field(None, description="The step in force (1-based), 0 while evaluating")
    traffic_percent: int | None = Field(None, description="Percent of traffic on the candidate revision")
    candidate: str | None = Field(None, description="Hash of the candidate's rendered model server")
    stable: str | None = Field(None, description="Hash of the stable (serving) model server")
    stable_spec: dict[str, Any] | None = Field(
        None, description="The DistilledModel spec of the stable revision (restored on rollback)",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    candidate_revision: str | None = Field(None, description="Knative revision of the candidate")
    stable_revision: str | None = Field(None, description="Knative revision that served when the rollout started")
    base_revision: str | None = Field(
        None, description="Latest Knative revision when the rollout started (an earlier candidate's: never this one's)")
    candidate_ready_at: str | None = Field(None, description="When the candidate revision was first ready (step 1's clock)")
    started_at: str | None = Field(None, description="When the rollout started (RFC 3339)")
    step_started_at: str | None = Field(None, description="When the current step (or the evaluation) started")
    evaluation_job: str | None = Field(None, description="Name of the evaluation Job of this rollout")
    message: str | None = Field(None, description="What the rollout is doing or why it ended")
    last_analysis: AnalysisResult | None = Field(None, description="The last judgement")


class DistilledModelStatus(ApiModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")  # kopf keeps its own bookkeeping next to ours

    phase: Phase | None = Field(None, description="Pending, Deploying, Ready, Failed or Degraded")
    conditions: list[Condition] = Field(default_factory=list, description="Validated, InferenceServiceReady, Ready")
    url: str | None = Field(None, description="Endpoint of the model (OpenAI API under /openai/v1)")
    inference_service: str | None = Field(None, description="Name of the child InferenceService")
    observed_generation: int | None = Field(None, description="The DistilledModel generation last acted upon")
    replicas: int | None = Field(None, description="Replicas currently serving (scale subresource)")
    message: str | None = Field(None, description="Why the model is not Ready, when it is not")
    gpu: str | None = Field(None, description="GPU summary for printer columns, e.g. 1x nvidia-tesla-t4")
    quantization: str | None = Field(None, description="Quantization summary for printer columns, e.g. int4-g128")
    rollout: RolloutStatus | None = Field(None, description="The stepped rollout (spec.rollout.steps)")
    deploying_since: str | None = Field(
        None, description="When this generation started deploying (Failed after startupTimeoutSeconds without ready)"
    )
    lineage: dict[str, Any] | None = Field(
        None, description="Where the weights come from: the DistillationJob, its artifact's sha256 and lineage "
        "(from the distillery.dev/lineage annotation that a DistillationJob's deploy writes)",
    )


class ObjectMeta(BaseModel):
    """The part of metadata the API reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class DistilledModel(BaseModel):
    """A whole DistilledModel object."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: Literal["distillery.dev/v1alpha1"] = Field("distillery.dev/v1alpha1", alias="apiVersion")
    kind: Literal["DistilledModel"] = "DistilledModel"
    metadata: ObjectMeta
    spec: DistilledModelSpec
    status: DistilledModelStatus | None = None


# ------------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a DistilledModel, with the field path it concerns (e.g. spec.autoscaling.minReplicas)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidSpec(ValueError):
    """A DistilledModel that cannot be deployed; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


# KServe names: a DNS-1035 label; Knative revisions are NAME-predictor-00001 (63 chars at most) and the
# default domain template puts NAME-predictor-NAMESPACE in one DNS label; Standard mode Services are
# NAME-predictor.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_LABEL_MAX = 63
KNATIVE_NAME_MAX = DNS_LABEL_MAX - len("-predictor-00001")
STANDARD_NAME_MAX = DNS_LABEL_MAX - len("-predictor")

# Shapes of the published R1-Distill students (hidden, intermediate), for checks that need them.
KNOWN_SHAPES: dict[str, tuple[int, int]] = {
    "qwen-1.5b": (1536, 8960),
    "qwen-7b": (3584, 18944),
    "qwen-14b": (5120, 13824),
    "qwen-32b": (5120, 27648),
    "llama-8b": (4096, 14336),
    "llama-70b": (8192, 28672),
}
_SHAPE_RE = re.compile(r"r1-distill-(qwen|llama)-(1\.5b|7b|8b|14b|32b|70b)", re.IGNORECASE)

GPUS_WITHOUT_BF16 = ("nvidia-tesla-t4", "nvidia-tesla-v100", "nvidia-tesla-p100", "nvidia-tesla-p4")


def known_shape(uri: str) -> tuple[int, int] | None:
    match = _SHAPE_RE.search(uri)
    if not match:
        return None
    return KNOWN_SHAPES.get(f"{match.group(1).lower()}-{match.group(2).lower()}")


def _loc_to_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[", "enum[")):
            path += f".{part}"
    return path


def problems_from_validation_error(error: ValidationError, prefix: str, short_name: str = "dm") -> list[Problem]:
    problems = []
    for item in error.errors():
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = f"unknown field (check the spelling; see kubectl explain {short_name}.spec)"
        problems.append(Problem(_loc_to_path(prefix, item["loc"]), message))
    return problems


def effective_metric(spec: DistilledModelSpec) -> ScaleMetric | None:
    """The autoscaling metric in force, with the default filled in (None when autoscaling is off)."""
    if spec.autoscaling is None:
        return None
    if spec.autoscaling.metric is not None:
        return spec.autoscaling.metric
    return ScaleMetric.CPU if spec.deployment_mode == DeploymentMode.STANDARD else ScaleMetric.CONCURRENCY


def effective_deployment_mode(spec: DistilledModelSpec) -> DeploymentMode:
    """The deployment mode: as set, or chosen from the autoscaling (concurrency/rps or scale to zero -> Knative)."""
    if spec.deployment_mode is not None:
        return spec.deployment_mode
    metric = effective_metric(spec)
    if metric in KNATIVE_KPA_METRICS:
        return DeploymentMode.KNATIVE
    if spec.autoscaling is not None and spec.autoscaling.min_replicas == 0 and metric not in KEDA_METRICS:
        return DeploymentMode.KNATIVE
    return DeploymentMode.STANDARD


def semantic_problems(
    spec: DistilledModelSpec, name: str, namespace: str | None = None, capabilities: Capabilities | None = None
) -> list[Problem]:
    """Cross-field rules that a schema cannot express, each with the reason spelled out."""
    problems: list[Problem] = []
    add = problems.append
    mode = effective_deployment_mode(spec)
    metric = effective_metric(spec)

    # Names KServe can turn into Services and Knative revisions.
    if not NAME_RE.match(name):
        add(Problem("metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)"))
    limit = KNATIVE_NAME_MAX if mode == DeploymentMode.KNATIVE else STANDARD_NAME_MAX
    if len(name) > limit:
        add(Problem("metadata.name", f"{len(name)} characters is too long for a KServe {mode.value} service: at most {limit}"))
    elif mode == DeploymentMode.KNATIVE and namespace:
        host_label = f"{name}-predictor-{namespace}"
        if len(host_label) > DNS_LABEL_MAX:
            add(Problem(
                "metadata.name",
                f"Knative host label {host_label!r} is {len(host_label)} characters (max {DNS_LABEL_MAX}); shorten the name",
            ))
    if spec.rollout.steps and len(name) <= limit:
        # A stepped rollout tags the candidate: Knative adds a `latest-` route (a Service and a host label),
        # 7 characters longer than the plain ones.
        tagged = [f"latest-{name}-predictor"] + ([f"latest-{name}-predictor-{namespace}"] if namespace else [])
        for label in tagged:
            if len(label) > DNS_LABEL_MAX:
                add(Problem("metadata.name", f"Knative tag route {label!r} of a stepped rollout is {len(label)} "
                                             f"characters (max {DNS_LABEL_MAX}); shorten the name"))
                break

    # Where the weights come from.
    scheme, sep, rest = spec.model.uri.partition("://")
    if not sep or scheme not in URI_SCHEMES:
        add(Problem("spec.model.uri", f"unknown URI scheme {scheme + '://' if sep else spec.model.uri!r}: use one of "
                    + ", ".join(s + "://" for s in URI_SCHEMES)))
    elif not rest.strip("/"):
        add(Problem("spec.model.uri", f"{spec.model.uri!r} names no bucket, repository or path"))
    if spec.model.revision and scheme != "hf":
        add(Problem("spec.model.revision", "revision applies only to hf:// sources"))

    # Quantization.
    quant = spec.quantization
    if quant.prequantized and quant.method == QuantMethod.NONE:
        add(Problem("spec.quantization.prequantized", "prequantized weights need method int8 or int4"))
    if quant.prequantized and spec.model.format == WeightFormat.GGUF:
        add(Problem("spec.quantization.prequantized", "a GGUF file is not in Distillery's quantized format; "
                    "run `model-runtime quantize` and use format safetensors"))
    if quant.method == QuantMethod.INT4 and (shape := known_shape(spec.model.uri)):
        for dim_name, dim in zip(("hidden size", "intermediate size"), shape, strict=True):
            if dim % quant.group_size:
                add(Problem("spec.quantization.groupSize",
                            f"int4 group size {quant.group_size} does not divide the model's {dim_name} {dim}"))

    # Serving.
    serving = spec.serving
    if serving.sampling.max_tokens > serving.max_model_len:
        add(Problem("spec.serving.sampling.maxTokens",
                    f"{serving.sampling.max_tokens} exceeds the context length maxModelLen {serving.max_model_len}"))
    # the renderer writes these from responseCache; a copy in args would silently win over it
    for arg in serving.args:
        flag = arg.split("=", 1)[0]
        if flag in (flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES, flags.FLAG_RESPONSE_CACHE_TTL_S):
            add(Problem("spec.serving.args", f"{flag} is set by spec.serving.responseCache "
                        "(enabled, maxEntries, ttlSeconds): set it there, not in args"))

    # GPUs.
    gpu = spec.resources.gpu
    if gpu is not None and gpu.count < 1 and gpu.type:
        add(Problem("spec.resources.gpu.count", f"GPU type {gpu.type!r} is set but count is {gpu.count}: use count >= 1"))
    if spec.hardware_profile == HardwareProfile.CPU and gpu is not None and gpu.count > 0:
        add(Problem("spec.resources.gpu", "hardwareProfile cpu asks for no GPU: remove resources.gpu or pick a GPU profile"))
    gpu_type = gpu.type if gpu is not None and gpu.type else None
    if gpu_type is None and spec.hardware_profile is not None:
        gpu_type = HARDWARE_PROFILES[spec.hardware_profile].gpu_type
    if serving.dtype == "bfloat16" and gpu_type in GPUS_WITHOUT_BF16:
        add(Problem("spec.serving.dtype", f"{gpu_type} has no bfloat16 support: use float16 or auto"))

    # Replicas and autoscaling (KServe's admission rules: which autoscaler accepts which metric).
    auto = spec.autoscaling
    if auto is not None:
        if spec.replicas is not None:
            add(Problem("spec.replicas", "set either spec.replicas (a fixed count) or spec.autoscaling, not both"))
        if auto.min_replicas > auto.max_replicas:
            add(Problem("spec.autoscaling.minReplicas",
                        f"minReplicas {auto.min_replicas} is greater than maxReplicas {auto.max_replicas}"))
        assert metric is not None
        if mode == DeploymentMode.KNATIVE and metric in KEDA_METRICS:
            add(Problem("spec.autoscaling.metric",
                        f"{metric.value} scales through KEDA, which KServe supports only in Standard mode"))
        if mode == DeploymentMode.STANDARD and metric in KNATIVE_KPA_METRICS:
            add(Problem("spec.autoscaling.metric",
                        f"{metric.value} needs Knative's autoscaler: set deploymentMode Knative, or use cpu, memory, "
                        "queueDepth or gpuUtilization in Standard mode"))
        if auto.min_replicas == 0 and metric in HPA_METRICS:
            add(Problem("spec.autoscaling.minReplicas",
                        f"scale to zero is impossible with the HPA ({metric.value}); use concurrency/rps (Knative) or "
                        "queueDepth/gpuUtilization (KEDA), or minReplicas >= 1"))
        if metric in (ScaleMetric.CPU, ScaleMetric.MEMORY, ScaleMetric.GPU_UTILIZATION) and auto.target is not None \
                and auto.target > 100:
            add(Problem("spec.autoscaling.target", f"{metric.value} target is a utilization percentage: 1-100"))
        if auto.scale_down_delay_seconds is not None and mode == DeploymentMode.KNATIVE and metric in HPA_METRICS:
            add(Problem("spec.autoscaling.scaleDownDelaySeconds",
                        "scale-down delay is a Knative KPA setting; it does not apply to cpu/memory on Knative"))
    if spec.rollout.canary_traffic_percent is not None and mode != DeploymentMode.KNATIVE:
        add(Problem("spec.rollout.canaryTrafficPercent", "KServe supports canary rollouts only in Knative mode"))
    problems += _rollout_problems(spec, mode)
    if capabilities is not None:
        problems += capability_problems(spec, capabilities)
    return problems


def _rollout_problems(spec: DistilledModelSpec, mode: DeploymentMode) -> list[Problem]:
    rollout = spec.rollout
    problems: list[Problem] = []
    if rollout.steps is not None:
        if any(b <= a for a, b in zip(rollout.steps, rollout.steps[1:], strict=False)):
            problems.append(Problem("spec.rollout.steps", f"{rollout.steps} must be strictly increasing"))
        if rollout.canary_traffic_percent is not None:
            problems.append(Problem("spec.rollout.steps", "set either canaryTrafficPercent (manual) or steps, not both"))
        if mode != DeploymentMode.KNATIVE:
            # KServe v0.20's schema carries a top-level spec.canary list, but its traffic split in Standard
            # (raw Deployment) mode is not something we can verify or observe per revision: refuse.
            problems.append(Problem("spec.rollout.steps", "stepped rollouts need Knative mode (KServe splits traffic "
                                    "between revisions only there): set deploymentMode Knative"))
    if rollout.analysis is not None:
        if rollout.steps is None:
            problems.append(Problem("spec.rollout.analysis", "analysis judges rollout steps: set spec.rollout.steps"))
        if duration_seconds(rollout.analysis.interval) < 1:
            problems.append(Problem("spec.rollout.analysis.interval", f"{rollout.analysis.interval!r} is under 1s"))
        evaluation = rollout.analysis.evaluation
        if evaluation is not None and evaluation.min_score is None and evaluation.max_regression is None:
            problems.append(Problem("spec.rollout.analysis.evaluation",
                                    "set minScore and/or maxRegression: an evaluation without either judges nothing"))
        if evaluation is not None and not evaluation.dataset.uri.startswith("pvc://"):
            problems.append(Problem("spec.rollout.analysis.evaluation.dataset.uri",
                                    "the evaluation Job mounts its dataset from a PersistentVolumeClaim: use pvc://CLAIM/PATH"))
        elif evaluation is not None and not evaluation.dataset.uri[len("pvc://"):].partition("/")[2]:
            problems.append(Problem("spec.rollout.analysis.evaluation.dataset.uri",
                                    f"{evaluation.dataset.uri!r} names no file in the claim: use pvc://CLAIM/PATH"))
    return problems


@dataclass(frozen=True)
class Capabilities:
    """What the cluster offers, as the operator's settings say: checked only where the operator validates."""

    prometheus: bool = False  # a Prometheus the operator may query for rollout analysis
    keda: bool = True


def capability_problems(spec: DistilledModelSpec, capabilities: Capabilities) -> list[Problem]:
    problems: list[Problem] = []
    slo = spec.rollout.analysis.slo if spec.rollout.analysis is not None else None
    if slo is not None and slo.model_dump(exclude_none=True) and not capabilities.prometheus:
        # Only the SLO thresholds query Prometheus: an interval or an evaluation gate alone does not.
        problems.append(Problem("spec.rollout.analysis.slo", "this operator has no Prometheus to judge rollouts with "
                                "(chart value rollouts.analysis.enabled / DISTILLERY_ROLLOUT_ANALYSIS_ENABLED): "
                                "remove analysis (steps then advance on a timer) or configure Prometheus"))
    metric = effective_metric(spec)
    if metric in KEDA_METRICS and not capabilities.keda:
        assert metric is not None
        problems.append(Problem("spec.autoscaling.metric", f"{metric.value} scales through KEDA, which this cluster "
                                "does not have (chart value keda.enabled / DISTILLERY_KEDA_ENABLED): use cpu or memory"))
    return problems


def object_envelope(obj: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, spec) of one of our objects, or InvalidSpec naming every envelope problem (apiVersion, kind,
    metadata.name, spec) at once; each resource's parser validates the spec itself."""
    problems: list[Problem] = []
    if obj.get("apiVersion") != constants.API_VERSION:
        problems.append(Problem("apiVersion", f"expected {constants.API_VERSION}, got {obj.get('apiVersion')!r}"))
    if obj.get("kind") != kind:
        problems.append(Problem("kind", f"expected {kind}, got {obj.get('kind')!r}"))
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict) or not metadata.get("name"):
        problems.append(Problem("metadata.name", "is required"))
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        problems.append(Problem("spec", "is required and must be an object"))
    if problems:
        raise InvalidSpec(problems)
    assert isinstance(metadata, dict) and isinstance(spec, dict)
    return metadata, spec


def parse_distilled_model(obj: dict[str, Any], capabilities: Capabilities | None = None) -> DistilledModel:
    """Validate a DistilledModel object (as read from YAML or the API); raise InvalidSpec with every problem.
    `capabilities` (the operator's view of the cluster) adds the checks that depend on it; None skips them."""
    metadata, raw_spec = object_envelope(obj, constants.KIND)
    try:
        spec = DistilledModelSpec.model_validate(raw_spec)
    except ValidationError as error:
        raise InvalidSpec(problems_from_validation_error(error, "spec")) from None
    problems = semantic_problems(spec, metadata["name"], metadata.get("namespace"), capabilities)
    if problems:
        raise InvalidSpec(problems)
    status = obj.get("status") or None
    try:
        status_model = DistilledModelStatus.model_validate(status) if status else None
    except ValidationError:
        status_model = None  # a mangled status is ours to rewrite, never a reason to refuse the spec
    return DistilledModel(
        apiVersion=constants.API_VERSION,
        kind=constants.KIND,
        metadata=ObjectMeta.model_validate(metadata),
        spec=spec,
        status=status_model,
    )


# ------------------------------------------------------------------------------- hardware profiles
@dataclass(frozen=True)
class ProfilePreset:
    """What a hardware profile fills in."""

    gpu_count: int
    gpu_type: str | None
    cpu: str
    memory: str
    max_gpus_per_node: int = 8  # the largest node of this kind (a DistillationJob's gpusPerNode cap)


HARDWARE_PROFILES: dict[HardwareProfile, ProfilePreset] = {
    HardwareProfile.CPU: ProfilePreset(0, None, "4", "8Gi", max_gpus_per_node=0),
    HardwareProfile.T4: ProfilePreset(1, "nvidia-tesla-t4", "4", "16Gi"),
    HardwareProfile.L4: ProfilePreset(1, "nvidia-l4", "8", "32Gi"),
    HardwareProfile.A10G: ProfilePreset(1, "nvidia-a10g", "8", "32Gi"),
    HardwareProfile.RTX4090: ProfilePreset(1, "nvidia-geforce-rtx-4090", "8", "32Gi"),
    HardwareProfile.A100_40GB: ProfilePreset(1, "nvidia-tesla-a100", "12", "85Gi", max_gpus_per_node=16),
    HardwareProfile.A100_80GB: ProfilePreset(1, "nvidia-a100-80gb", "12", "170Gi"),
    HardwareProfile.H100: ProfilePreset(1, "nvidia-h100-80gb", "16", "200Gi"),
}


@dataclass(frozen=True)
class ResolvedResources:
    """Resources after the hardware profile is applied: what the renderer turns into a pod spec."""

    gpu_count: int
    gpu_type: str | None
    gpu_resource_name: str
    cpu: str | None
    memory: str | None


def resolve_resources(spec: DistilledModelSpec) -> ResolvedResources:
    """Merge the hardware profile preset with explicit resources (explicit values win)."""
    preset = HARDWARE_PROFILES.get(spec.hardware_profile) if spec.hardware_profile else None
    gpu = spec.resources.gpu
    gpu_count = gpu.count if gpu is not None else (preset.gpu_count if preset else 0)
    gpu_type = (gpu.type if gpu is not None and gpu.type else None) or (preset.gpu_type if preset else None)
    return ResolvedResources(
        gpu_count=gpu_count,
        gpu_type=gpu_type if gpu_count > 0 else None,
        gpu_resource_name=gpu.resource_name if gpu is not None else constants.DEFAULT_GPU_RESOURCE,
        cpu=spec.resources.cpu or (preset.cpu if preset else None),
        memory=spec.resources.memory or (preset.memory if preset else None),
    )
