"""The operator's settings: one typed object per process, read from DISTILLERY_* environment variables.

`OperatorSettings` is built once at start-up (validated there, so a bad value stops the process with a
clear message) and passed down; the renderer sees only the `RenderSettings` part, as an argument.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import constants


class RenderSettings(BaseModel):
    """What the pure renderer needs from the environment; never read from globals."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime_name_cpu: str = Field(constants.RUNTIME_NAME_CPU, description="ClusterServingRuntime for CPU-only models")
    runtime_name_gpu: str = Field(constants.RUNTIME_NAME_GPU, description="ClusterServingRuntime for GPU models")
    runtime_image: str | None = Field(
        None, description="Override of the runtime container image (empty: the ClusterServingRuntime's image)"
    )
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus address that KEDA queries for queueDepth/gpuUtilization autoscaling",
    )
    gpu_node_label: str = Field(
        "cloud.google.com/gke-accelerator",
        description="Node label whose value is the GPU type (spec.resources.gpu.type) in node selectors",
    )
    trainer_image: str = Field(
        constants.DEFAULT_TRAINER_IMAGE, min_length=1, description="Image of the DistillationJobs' TrainJobs"
    )
    training_runtime_name: str = Field(
        constants.TRAINING_RUNTIME_NAME, min_length=1,
        description="ClusterTrainingRuntime the DistillationJobs' TrainJobs run on (the chart ships it)",
    )
    keda_enabled: bool = Field(
        True, description="The cluster has KEDA: queueDepth/gpuUtilization autoscaling is accepted (chart keda.enabled)"
    )
    rollout_analysis_enabled: bool = Field(
        False, description="Rollout analysis may query Prometheus at prometheus_url (chart rollouts.analysis.enabled)"
    )
    evaluation_image: str = Field(
        constants.DEFAULT_OPERATOR_IMAGE, min_length=1,
        description="Image of the rollout evaluation Jobs (distillery-eval; the operator's own image)",
    )


class OperatorSettings(BaseSettings):
    """Settings of the operator process (env prefix DISTILLERY_)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore", frozen=True)

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated or JSON list); empty means all namespaces",
    )
    # The renderer's settings, with their defaults taken from RenderSettings (defined once there).
    runtime_name_cpu: str = RenderSettings.model_fields["runtime_name_cpu"].default
    runtime_name_gpu: str = RenderSettings.model_fields["runtime_name_gpu"].default
    runtime_image: str | None = None
    prometheus_url: str = RenderSettings.model_fields["prometheus_url"].default
    gpu_node_label: str = RenderSettings.model_fields["gpu_node_label"].default
    trainer_image: str = RenderSettings.model_fields["trainer_image"].default
    training_runtime_name: str = RenderSettings.model_fields["training_runtime_name"].default
    keda_enabled: bool = RenderSettings.model_fields["keda_enabled"].default
    rollout_analysis_enabled: bool = RenderSettings.model_fields["rollout_analysis_enabled"].default
    evaluation_image: str = RenderSettings.model_fields["evaluation_image"].default
    rollout_tick_seconds: float = Field(
        10.0, gt=0, description="How often a model in a rollout is looked at (steps are judged on their interval)"
    )
    resync_seconds: float = Field(300.0, gt=0, description="Periodic resync (drift backstop) interval")
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int = Field(9090, ge=0, le=65535, description="Port of the operator's Prometheus metrics (0: off)")
    liveness_port: int = Field(8080, ge=0, le=65535, description="Port of kopf's liveness endpoint (/healthz)")
    peering_name: str = Field("distillery", description="kopf peering object name (leader election)")
    standalone: bool = Field(False, description="Run without peering (a single replica)")
    peering_priority: int | None = Field(
        None, ge=0, description="kopf peering priority of this replica (empty: a random one per process)"
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    def render_settings(self) -> RenderSettings:
        values = self.model_dump(include=set(RenderSettings.model_fields))
        values["runtime_image"] = values["runtime_image"] or None  # an empty env var means "not set"
        return RenderSettings(**values)
