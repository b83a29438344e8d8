"""The trainer's last word to the operator: a `TrainResult` (distillery_contract.distillation) written by
rank 0 to RESULT_FILE, the container's Kubernetes termination message, from which the operator fills the
DistillationJob's status.artifact, status.progress and status.lineage. The kubelet keeps at most
RESULT_MAX_BYTES of it, so the lineage travels as a summary; the whole lineage.json is in the artifact,
and the artifact's sha256 is that file's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distillery_contract.distillation import (
    LINEAGE_FILE,
    RESULT_FILE,
    RESULT_MAX_BYTES,
    ArtifactRef,
    TrainProgress,
    TrainResult,
)
from distillery_trainer.artifact import sha256_file

RESULT_FILE_ENV = "DISTILLERY_RESULT_FILE"  # tests and local runs point it elsewhere


def result_path() -> Path:
    return Path(os.environ.get(RESULT_FILE_ENV, RESULT_FILE))


def train_result(output_uri: str, output_dir: Path, lineage: dict[str, Any]) -> TrainResult:
    digest = sha256_file(output_dir / LINEAGE_FILE).removeprefix("sha256:")
    validation = lineage.get("metrics", {}).get("validation", {})
    after = validation.get("after") or {}
    before = validation.get("before") or {}
    summary: dict[str, Any] = {
        "teacher": lineage["teacher"]["uri"],
        "student": lineage["student"]["uri"],
        "dataset": lineage["dataset"]["uri"],
        "datasetSha256": lineage["dataset"]["sha256"],
        "method": lineage["method"],
        "steps": lineage["steps"],
        "klBefore": before.get("kl"),
        "klAfter": after.get("kl"),
        "validationLossBefore": before.get("ce"),
        "validationLossAfter": after.get("ce"),
        "trainLoss": lineage["metrics"]["train"]["loss"],
        "quantized": (lineage.get("quantized") or {}).get("method"),
        "codeVersion": lineage["codeVersion"],
    }
    return TrainResult(
        artifact=ArtifactRef(uri=output_uri, sha256=digest),
        progress=TrainProgress(step=lineage["steps"], total_steps=lineage["training"]["maxSteps"],
                               loss=lineage["metrics"]["train"]["loss"], validation_loss=after.get("ce")),
        lineage={k: v for k, v in summary.items() if v is not None},
    )


def encode(result: TrainResult) -> bytes:
    """JSON within RESULT_MAX_BYTES: the long strings of the summary give way first, then the summary."""
    data = result.model_dump(by_alias=True, exclude_none=True, mode="json")
    for drop in ((), ("codeVersion",), ("teacher", "student", "dataset"), tuple(data["lineage"])):
        for key in drop:
            data["lineage"].pop(key, None)
        raw = json.dumps(data, separators=(",", ":")).encode()
        if len(raw) <= RESULT_MAX_BYTES:
            return raw
    raise ValueError("the train result does not fit the termination message")  # an URI of over 4 KiB


def write_result(result: TrainResult, path: Path | None = None) -> Path | None:
    """Write the result where the operator reads it; None when that place does not exist (a local run:
    the kubelet creates the termination-message file in a pod, and nothing else should create it)."""
    if path is None:
        path = result_path()
        if not path.exists() and RESULT_FILE_ENV not in os.environ:
            return None
    if not path.parent.is_dir():
        return None
    try:
        path.write_bytes(encode(result))
    except PermissionError:
        return None
    return path
