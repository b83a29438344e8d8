"""The DistillationJob resource (distillery.dev/v1alpha1): the whole object, its status, and its validation.

The spec is the contract's `DistillationJobSpec` (the trainer parses the same models); this module adds
what only the control plane needs: the object and status models (the CRD is generated from them) and
`parse_distillation_job`, which refuses an object with every problem and its field path: pydantic's
errors, the contract's cross-field rules (`spec_problems`) and the operator's own (names that fit a
TrainJob and its JobSet, GPUs per node against the hardware profile). Problem, InvalidSpec, ObjectMeta
and Condition are the DistilledModel API's, shared.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillery_contract.apimodel import ApiModel
from distillery_contract.distillation import DistillationJobSpec, spec_problems

from . import constants
from .api import (
    DNS_LABEL_MAX,
    HARDWARE_PROFILES,
    NAME_RE,
    STANDARD_NAME_MAX,
    Condition,
    InvalidSpec,
    ObjectMeta,
    Problem,
    object_envelope,
    problems_from_validation_error,
)


class JobPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class JobProgress(ApiModel):
    """How far training is (from the TrainJob's trainerStatus while running, the trainer's result at the end)."""

    step: int | None = Field(None, description="Optimizer steps done")
    total_steps: int | None = Field(None, description="Optimizer steps planned")
    loss: float | None = Field(None, description="Latest training loss")
    validation_loss: float | None = Field(None, description="Latest validation loss")
    percent: int | None = Field(None, description="Share of the steps done, 0-100")
    summary: str | None = Field(None, description="Printer-column text, e.g. 120/500 or 24%")


class JobArtifact(ApiModel):
    """The distilled student."""

    uri: str | None = Field(None, description="Where the student was written (spec.output.uri)")
    sha256: str | None = Field(None, description="sha256 of the artifact's lineage.json (which lists every weight file's sha256)")
    quantized_uri: str | None = Field(None, description="The pre-quantized artifact (with spec.quantization)")


class DistillationJobStatus(ApiModel):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="allow")  # kopf keeps its own bookkeeping next to ours

    phase: JobPhase | None = Field(None, description="Pending, Running, Succeeded or Failed")
    conditions: list[Condition] = Field(
        default_factory=list, description="Validated, TrainerInstalled, Succeeded and (with spec.deploy) Deployed"
    )
    train_job: str | None = Field(None, description="Name of the child Kubeflow Trainer TrainJob")
    progress: JobProgress | None = Field(None, description="Training progress")
    artifact: JobArtifact | None = Field(None, description="The distilled student, once written")
    lineage: dict[str, Any] | None = Field(
        None, description="Teacher, student, dataset, loss and training parameters, final losses (from lineage.json)"
    )
    deployed_model: str | None = Field(None, description="The DistilledModel now serving the artifact (spec.deploy)")
    deployed_artifact: str | None = Field(
        None, description="sha256 of the artifact last deployed (spec.deploy acts once per generation and artifact)"
    )
    observed_generation: int | None = Field(None, description="The generation last acted upon")
    message: str | None = Field(None, description="Why the job is not (yet) Succeeded")


class DistillationJob(BaseModel):
    """A whole DistillationJob object."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: Literal["distillery.dev/v1alpha1"] = Field("distillery.dev/v1alpha1", alias="apiVersion")
    kind: Literal["DistillationJob"] = "DistillationJob"
    metadata: ObjectMeta
    spec: DistillationJobSpec
    status: DistillationJobStatus | None = None


# A TrainJob's JobSet names its Jobs NAME-node-INDEX and their pods' hostnames NAME-node-INDEX-RANK:
# every one of them must stay a DNS label.
TRAINJOB_NAME_MAX = DNS_LABEL_MAX - len(f"-{constants.TRAINER_NODE_JOB}--0")


def trainjob_name_max(num_nodes: int) -> int:
    return TRAINJOB_NAME_MAX - len(str(max(0, num_nodes - 1)))


def operator_problems(spec: DistillationJobSpec, name: str) -> list[Problem]:
    """The operator's rules beside the contract's: names, GPUs per node of the hardware profile."""
    problems: list[Problem] = []
    if not NAME_RE.match(name):
        problems.append(Problem(
            "metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)"
        ))
    limit = trainjob_name_max(spec.resources.num_nodes)
    if len(name) > limit:
        problems.append(Problem(
            "metadata.name",
            f"{len(name)} characters is too long for a TrainJob of {spec.resources.num_nodes} node(s): at most {limit} "
            "(its JobSet's pods are named NAME-node-INDEX-RANK, a DNS label)",
        ))
    profile = spec.resources.hardware_profile
    if profile is not None:
        most = HARDWARE_PROFILES[profile].max_gpus_per_node
        if most and spec.resources.gpus_per_node > most:
            problems.append(Problem(
                "spec.resources.gpusPerNode",
                f"{spec.resources.gpus_per_node} GPUs per node: {profile.value} nodes have at most {most}",
            ))
    if spec.deploy is not None:
        target = spec.deploy.distilled_model
        if not NAME_RE.match(target) or len(target) > STANDARD_NAME_MAX:
            problems.append(Problem(
                "spec.deploy.distilledModel",
                f"{target!r} is not a DistilledModel name (a DNS-1035 label of at most {STANDARD_NAME_MAX} characters)",
            ))
    return problems


def validate_spec(raw_spec: Any, name: str) -> DistillationJobSpec:
    """A validated spec, or InvalidSpec listing every problem with its field path."""
    if not isinstance(raw_spec, dict):
        raise InvalidSpec([Problem("spec", "is required and must be an object")])
    try:
        spec = DistillationJobSpec.model_validate(raw_spec)
    except ValidationError as error:
        raise InvalidSpec(problems_from_validation_error(error, "spec", "dj")) from None
    problems = [Problem(path, message) for path, message in spec_problems(spec)]
    problems += operator_problems(spec, name)
    if problems:
        raise InvalidSpec(problems)
    return spec


def parse_distillation_job(obj: dict[str, Any]) -> DistillationJob:
    """Validate a DistillationJob object (as read from YAML or the API); raise InvalidSpec with every problem."""
    metadata, raw_spec = object_envelope(obj, constants.DJ_KIND)
    spec = validate_spec(raw_spec, str(metadata["name"]))
    try:
        status = DistillationJobStatus.model_validate(obj["status"]) if obj.get("status") else None
    except ValidationError:
        status = None  # a mangled status is ours to rewrite, never a reason to refuse the spec
    return DistillationJob(
        apiVersion=constants.API_VERSION, kind=constants.DJ_KIND, metadata=ObjectMeta.model_validate(metadata),
        spec=spec, status=status,
    )
