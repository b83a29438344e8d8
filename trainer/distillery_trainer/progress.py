"""Progress where a user looks: the Trainer's progress bar in the logs, and a machine-readable line per
logging step (`DISTILLERY_PROGRESS {"step": .., "total": .., "loss": ..}`) that the operator can pick out
of the pod's log, mirrored into a JSON file (progress.json beside the checkpoints) for a sidecar or a
shared volume, and posted to the TrainJob's status.trainerStatus where Kubeflow Trainer takes it
(trainer_status.py). Only the main process reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distillery_trainer.trainer_status import TrainerStatusPoster

PROGRESS_PREFIX = "DISTILLERY_PROGRESS "
PROGRESS_FILE = "progress.json"


def progress_record(step: int, total: int, loss: float | None, **extra: Any) -> dict[str, Any]:
    return {"step": step, "total": total, "loss": loss, "time": round(time.time(), 3), **extra}


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The record in a log line written by ProgressReporter, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        record = json.loads(line[len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class ProgressReporter(TrainerCallback):
    def __init__(self, path: Path | None, stream: Any = None, poster: TrainerStatusPoster | None = None) -> None:
        self.path = path
        self.stream = stream
        self.poster = poster or TrainerStatusPoster()
        self.last_loss: float | None = None

    def report(self, record: dict[str, Any]) -> None:
        out = self.stream or sys.stdout
        out.write(PROGRESS_PREFIX + json.dumps(record) + "\n")
        out.flush()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)  # a reader never sees half a file

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.last_loss = float(logs["loss"])
        extra = {k: logs[k] for k in ("kl", "ce", "learning_rate") if k in logs}
        self.report(progress_record(state.global_step, state.max_steps, self.last_loss, **extra))
        self.poster.post(state.global_step, state.max_steps, self.last_loss,
                         **{k: v for k, v in extra.items() if k != "learning_rate"})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.report(progress_record(state.global_step, state.max_steps, self.last_loss, done=True))
            self.poster.post(state.global_step, state.max_steps, self.last_loss, final=True)
