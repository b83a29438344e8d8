"""Fixtures for the API/renderer tests: sample DistilledModels, a strict InferenceService validator."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillery_operator.settings import RenderSettings
from tests.kserve_schema import kserve_validator

SAMPLES_DIR = Path(__file__).resolve().parents[3] / "manifests" / "samples"


def minimal_dm(name: str = "r1", **spec: Any) -> dict[str, Any]:
    """A valid DistilledModel object with only the model URI set, plus any spec overrides."""
    body: dict[str, Any] = {"model": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}}
    body.update(copy.deepcopy(spec))
    return {
        "apiVersion": "distillery.dev/v1alpha1",
        "kind": "DistilledModel",
        "metadata": {"name": name, "namespace": "models"},
        "spec": body,
    }


@pytest.fixture
def make_dm():
    return minimal_dm


@pytest.fixture(scope="session")
def sample_paths() -> list[Path]:
    paths = sorted(SAMPLES_DIR.glob("*.yaml"))
    assert len(paths) >= 3, "the three samples of the Foundation issue must exist"
    return paths


@pytest.fixture(scope="session")
def sample_objects(sample_paths) -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sample_paths}


@pytest.fixture(scope="session")
def render_settings() -> RenderSettings:
    return RenderSettings(prometheus_url="http://prometheus.monitoring:9090")


@pytest.fixture(scope="session")
def isvc_validator(kserve_reference_dir):
    return kserve_validator(kserve_reference_dir / "serving.kserve.io_inferenceservices.yaml")
