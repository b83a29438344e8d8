"""The DistillationJob's spec (distillery.dev/v1alpha1): what the operator validates and renders into a
Kubeflow Trainer TrainJob, and what the trainer (`distillery-train -f job.yaml`, the same code the pods
run) reads. Both sides parse it with these models, so they cannot disagree on a field or a default.

The method is teacher -> student knowledge distillation: the student learns the teacher's softened output
distribution (KL divergence at temperature T, scaled by T^2) mixed with the ordinary cross-entropy on the
data: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, over non-padding tokens;
optionally as LoRA on the student.

Rules that involve one field live on the field (bounds, enums); rules across fields are in
`spec_problems`, which both sides apply (the operator adds its own: names, GPUs per hardware profile).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Final, Literal

from pydantic import ConfigDict, Field, field_validator

from distillery_contract.apimodel import ApiModel
from distillery_contract.values import DEFAULT_GROUP_SIZE, GroupSize, HardwareProfile

# hf://ORG/REPO, s3://BUCKET/PATH, gs://BUCKET/PATH, pvc://CLAIM/PATH (mounted into the pods)
DISTILLATION_URI_SCHEMES: Final = ("hf", "s3", "gs", "pvc")

LINEAGE_FILE: Final = "lineage.json"  # written into the artifact beside the weights
QUANTIZED_SUBDIR: Final = "quantized"  # the optional pre-quantized artifact, inside the output

# --- how the operator's TrainJob and the trainer meet (both sides import these) ---
# pvc://CLAIM/PATH: the operator mounts claim CLAIM at PVC_MOUNT_ROOT/CLAIM in every trainer pod, so the
# trainer reads and writes PVC_MOUNT_ROOT/CLAIM/PATH (`pvc_path`).
PVC_MOUNT_ROOT: Final = "/mnt/pvc"
# The pods run `distillery-train -f JOB_FILE` (under torchrun); JOB_FILE holds the DistillationJob
# manifest as JSON (apiVersion, kind, metadata, spec; JSON is YAML), projected from a pod annotation.
JOB_DIR: Final = "/etc/distillery"
JOB_FILE: Final = f"{JOB_DIR}/job.json"
# When it finishes, rank 0 writes a `TrainResult` as JSON to RESULT_FILE (the container's Kubernetes
# termination message, at most 4096 bytes); the operator reads it from the pod's status and fills the
# DistillationJob's status.artifact, status.lineage and status.progress from it.
RESULT_FILE: Final = "/dev/termination-log"
RESULT_MAX_BYTES: Final = 4096
# Progress while running: Kubeflow Trainer's TrainJob status.trainerStatus (progressPercentage and
# metrics), which the operator mirrors; the metric names it reads:
PROGRESS_METRICS: Final = ("step", "totalSteps", "loss")


class ModelRef(ApiModel):
    """A model checkpoint (Hugging Face layout: config.json, safetensors, tokenizer)."""

    uri: str = Field(min_length=1, max_length=2048, description="hf://ORG/REPO, s3://, gs:// or pvc://CLAIM/PATH")
    revision: str | None = Field(None, max_length=256, description="Branch, tag or commit, for hf:// sources")


class DatasetFormat(StrEnum):
    CHAT = "chat"  # one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]}
    TEXT = "text"  # one JSON object per line: {"text": ...}


class Dataset(ApiModel):
    """Training data: JSON Lines, one example per line."""

    uri: str = Field(min_length=1, max_length=2048, description="A .jsonl file: hf://, s3://, gs:// or pvc://CLAIM/PATH")
    format: DatasetFormat = Field(
        DatasetFormat.CHAT, description='chat: {"messages": [...]} rendered with the chat template; text: {"text": ...}'
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, le=0.5, description="Share of the examples held out for the validation loss and KL (0: none)"
    )


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"


class Lora(ApiModel):
    """LoRA adapters on the student (method lora); merged into the weights of the artifact."""

    rank: int = Field(16, ge=1, le=1024, description="Rank of the adapter matrices")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
        description="Names of the student's linear layers that get adapters",
    )


class Loss(ApiModel):
    """The distillation loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy."""

    temperature: float = Field(2.0, gt=0.0, le=100.0, description="Softmax temperature T of both distributions")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the KL term (1 - alpha on the cross-entropy)")


class Training(ApiModel):
    """The training loop (transformers Trainer): schedule, batch and sequence length."""

    epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Passes over the training examples")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; when set, overrides epochs")
    learning_rate: float = Field(5.0e-5, gt=0.0, le=1.0, description="Peak learning rate (cosine schedule)")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step")
    max_seq_length: int = Field(2048, ge=16, le=1_048_576, description="Tokens per example (longer ones are cut)")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    seed: int = Field(42, ge=0, description="Seed of the data order, the split and the initialisation")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision: auto picks bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU"
    )
    save_steps: int = Field(200, ge=1, description="Checkpoint every this many steps (a restarted job resumes)")
    logging_steps: int = Field(10, ge=1, description="Report loss and progress every this many steps")


class Resources(ApiModel):
    """Where the TrainJob runs: nodes, GPUs per node (one process per GPU) and the GPU kind."""

    num_nodes: int = Field(1, ge=1, le=1024, description="Nodes (torchrun --nnodes)")
    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs per node (torchrun --nproc-per-node); 0: CPU")
    hardware_profile: HardwareProfile | None = Field(
        None, description="GPU kind to schedule on (node selector, tolerations); cpu for no GPU"
    )
    cpu: str | None = Field(None, description="CPU request and limit per node, e.g. 8")
    memory: str | None = Field(None, description="Memory request and limit per node, e.g. 64Gi")


class Output(ApiModel):
    """Where the distilled student is written."""

    uri: str = Field(min_length=1, max_length=2048, description="s3://, gs://, pvc://CLAIM/PATH or hf://ORG/REPO")


class OutputQuantization(ApiModel):
    """Also write a pre-quantized runtime artifact (served with --prequantized)."""

    method: Literal["int8", "int4"] = Field(description="int8 (per channel) or int4 (group-wise)")
    group_size: GroupSize = Field(DEFAULT_GROUP_SIZE, description="int4 group size")


class Deploy(ApiModel):
    """On success, point a DistilledModel at the result."""

    distilled_model: str = Field(min_length=1, max_length=253, description="Name of the DistilledModel (same namespace)")


class DistillationJobSpec(ApiModel):
    """Desired state of a distillation run: teacher -> student on Kubeflow Trainer."""

    teacher: ModelRef = Field(description="The teacher (frozen, eval mode, no gradients)")
    student: ModelRef = Field(description="The student to train; must share the teacher's tokenizer")
    dataset: Dataset = Field(description="Training data")
    method: Method = Field(Method.FULL, description="full: every student weight; lora: adapters only")
    lora: Lora | None = Field(None, description="LoRA settings (method lora only)")
    loss: Loss = Field(default_factory=Loss, description="Distillation loss")
    training: Training = Field(default_factory=Training, description="Training loop")
    resources: Resources = Field(default_factory=Resources, description="Nodes and GPUs")
    output: Output = Field(description="Where the distilled student is written")
    quantization: OutputQuantization | None = Field(None, description="Also write a pre-quantized artifact")
    deploy: Deploy | None = Field(None, description="On success, point this DistilledModel at the artifact")


def uri_problem(uri: str, schemes: tuple[str, ...] = DISTILLATION_URI_SCHEMES) -> str | None:
    """Why `uri` is not a usable location, or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in schemes:
        return (f"unknown URI scheme {scheme + '://' if sep else uri!r}: use one of "
                + ", ".join(s + "://" for s in schemes))
    if not rest.strip("/"):
        return f"{uri!r} names no bucket, repository or path"
    return None


def spec_problems(spec: DistillationJobSpec) -> list[tuple[str, str]]:
    """Cross-field rules of the spec itself, as (field path, message); empty when the spec is runnable."""
    problems: list[tuple[str, str]] = []
    for path, ref in (("spec.teacher", spec.teacher), ("spec.student", spec.student), ("spec.dataset", spec.dataset),
                      ("spec.output", spec.output)):
        if problem := uri_problem(ref.uri):
            problems.append((f"{path}.uri", problem))
    for path, model in (("spec.teacher", spec.teacher), ("spec.student", spec.student)):
        if model.revision and not model.uri.startswith("hf://"):
            problems.append((f"{path}.revision", "revision applies only to hf:// sources"))
    if spec.teacher.uri == spec.student.uri and spec.teacher.revision == spec.student.revision:
        problems.append(("spec.student.uri", "the student is the teacher: distil into a different model"))
    if spec.lora is not None and spec.method != Method.LORA:
        problems.append(("spec.lora", "lora settings apply only to method lora"))
    resources = spec.resources
    if resources.hardware_profile == HardwareProfile.CPU and resources.gpus_per_node > 0:
        problems.append(("spec.resources.gpusPerNode",
                         f"hardwareProfile cpu has no GPU: set gpusPerNode 0 (got {resources.gpus_per_node})"))
    if resources.hardware_profile not in (None, HardwareProfile.CPU) and resources.gpus_per_node == 0:
        problems.append(("spec.resources.gpusPerNode",
                         f"hardwareProfile {resources.hardware_profile} is a GPU: set gpusPerNode >= 1"))
    if spec.training.precision == "bf16" and resources.hardware_profile == HardwareProfile.T4:
        problems.append(("spec.training.precision", "t4 has no bfloat16: use fp16 or auto"))
    return problems


def pvc_path(uri: str) -> str:
    """Where the pods see pvc://CLAIM/PATH: PVC_MOUNT_ROOT/CLAIM/PATH."""
    scheme, sep, rest = uri.partition("://")
    if scheme != "pvc" or not sep or not rest.strip("/"):
        raise ValueError(f"{uri!r} is not a pvc://CLAIM/PATH URI")
    return f"{PVC_MOUNT_ROOT}/{rest.strip('/')}"


def pvc_claims(spec: DistillationJobSpec) -> list[str]:
    """The PersistentVolumeClaims a job reads or writes (first path segment of each pvc:// URI), sorted."""
    uris = (spec.teacher.uri, spec.student.uri, spec.dataset.uri, spec.output.uri)
    return sorted({u.partition("://")[2].strip("/").split("/")[0] for u in uris if u.startswith("pvc://")} - {""})


def finite(value: object) -> object:
    """`value` with every NaN or infinite float (at any depth) made None: JSON has no such numbers, and
    the API server refuses a status or annotation that holds one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


class _Lenient(ApiModel):
    # Read from a trainer that may be newer than the operator: unknown fields are ignored, not refused.
    model_config = ConfigDict(extra="ignore")


class ArtifactRef(_Lenient):
    """The distilled student as written."""

    uri: str = Field(description="Where it was written (spec.output.uri)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of its lineage.json (which lists every weight file's sha256)")


class TrainProgress(_Lenient):
    """How far training is."""

    step: int = Field(0, ge=0, description="Optimizer steps done")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned")
    loss: float | None = Field(None, description="Latest training loss")
    validation_loss: float | None = Field(None, description="Latest validation loss")

    @field_validator("loss", "validation_loss")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        # A diverged run reports NaN/Inf: "no usable loss", not a number the job's status cannot hold.
        return value if value is None or math.isfinite(value) else None


class TrainResult(_Lenient):
    """What rank 0 writes to RESULT_FILE at the end: the artifact, the final progress, a lineage summary."""

    artifact: ArtifactRef
    progress: TrainProgress | None = None
    lineage: dict[str, object] = Field(default_factory=dict, description="Summary of lineage.json")

    @field_validator("lineage")
    @classmethod
    def _finite_lineage(cls, value: dict[str, object]) -> dict[str, object]:
        return finite(value)  # type: ignore[return-value]
