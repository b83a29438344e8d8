"""Static checks of the two Dockerfiles (Docker cannot run here): base images, extras, users, contexts."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
OPERATOR = REPO / "operator" / "Dockerfile"
RUNTIME = REPO / "model_runtime" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copied_sources(path: Path) -> list[str]:
    sources = []
    for word, rest in instructions(path):
        if word == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    return sources


def test_operator_image_is_slim_without_torch_and_non_root() -> None:
    ins = instructions(OPERATOR)
    text = OPERATOR.read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "'.[operator]'" in runs and "runtime]" not in runs and "torch==" not in runs
    users = [rest for word, rest in ins if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), (
        "numeric non-root user (runAsNonRoot)"
    )
    assert ("ENTRYPOINT", '["distillery", "run"]') in ins
    assert "model_runtime" not in " ".join(copied_sources(OPERATOR))


def test_runtime_image_has_cpu_and_cuda_variants() -> None:
    ins = instructions(RUNTIME)
    # Global ARGs with defaults (a stage re-declares some without one to bring them into scope).
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    assert args["VARIANT"] == "cpu"
    stages = [rest for word, rest in ins if word == "FROM"]
    assert any(s.endswith("AS base-cpu") and "PYTHON_IMAGE" in s for s in stages)
    assert any(s.endswith("AS base-cuda") and "CUDA_IMAGE" in s for s in stages)
    assert "base-${VARIANT}" in stages[-1]
    assert args["CPU_TORCH_INDEX"].endswith("/whl/cpu") and "/whl/cu" in args["CUDA_TORCH_INDEX"]
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert args["TORCH_VERSION"] == "2.13.0"  # the version pyproject pins
    assert "torch==2.13.0" in (REPO / "pyproject.toml").read_text()
    assert ("ENTRYPOINT", '["python", "-m", "model_runtime"]') in ins
    users = [rest for word, rest in ins if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1])


def test_dockerignores_allow_exactly_what_the_images_copy() -> None:
    for dockerfile in (OPERATOR, RUNTIME):
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        lines = [
            ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ]
        assert lines[0] == "*", f"{ignore.name}: allow-list (start from *)"
        allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
        for source in copied_sources(dockerfile):
            assert source.rstrip("/") in allowed, f"{dockerfile}: COPY {source} is excluded by {ignore.name}"
            assert (REPO / source).exists() or source.startswith("model_runtime"), source
