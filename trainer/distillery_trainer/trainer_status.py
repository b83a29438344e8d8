"""Progress into the TrainJob's status.trainerStatus, which the operator mirrors into the DistillationJob.

Kubeflow Trainer's TrainJob progress feature (KEP-2779, the `TrainJobStatus` feature gate) is push-based:
the controller injects KUBEFLOW_TRAINER_STATUS_URL (its status endpoint for this TrainJob), a CA
certificate and a projected service-account token into the pods, and the training code POSTs
{"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics: [{name, value}], lastUpdatedTime}}.
The metrics carry the names the operator reads (PROGRESS_METRICS: step, totalSteps, loss). Without the
variables (feature gate off, a local run) nothing is sent; a failed post is logged and training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from datetime import UTC, datetime
from typing import Any
from urllib import request

from distillery_contract.distillation import PROGRESS_METRICS

log = logging.getLogger("distillery_trainer.status")

URL_ENV = "KUBEFLOW_TRAINER_STATUS_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_STATUS_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_STATUS_TOKEN"
MIN_INTERVAL_S = 10.0  # the endpoint rate-limits; a fast job must not post every step
TIMEOUT_S = 5.0


def payload(step: int, total: int, loss: float | None, elapsed_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    step_name, total_name, loss_name = PROGRESS_METRICS
    metrics = {step_name: step, total_name: total, loss_name: loss, **extra}
    status: dict[str, Any] = {
        "metrics": [{"name": k, "value": f"{v:.6g}" if isinstance(v, float) else str(v)}
                    for k, v in metrics.items() if v is not None],
        "lastUpdatedTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if total > 0:
        status["progressPercentage"] = max(0, min(100, int(100 * step / total)))
        if 0 < step < total:
            status["estimatedRemainingSeconds"] = int(elapsed_s / step * (total - step))
    return {"trainerStatus": status}


class TrainerStatusPoster:
    """POSTs progress to the TrainJob's status endpoint, at most every MIN_INTERVAL_S (the last always)."""

    def __init__(self, env: dict[str, str] | None = None, min_interval_s: float = MIN_INTERVAL_S) -> None:
        env = dict(os.environ) if env is None else env
        self.url = env.get(URL_ENV)
        self.ca_cert = env.get(CA_CERT_ENV)
        self.token_file = env.get(TOKEN_ENV)
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        self.last_post = -float("inf")

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def post(self, step: int, total: int, loss: float | None, *, final: bool = False, **extra: Any) -> bool:
        now = time.monotonic()
        if not self.url or (not final and now - self.last_post < self.min_interval_s):
            return False
        self.last_post = now
        body = json.dumps(payload(step, total, loss, now - self.started, extra)).encode()
        headers = {"Content-Type": "application/json"}
        try:
            if self.token_file:  # re-read each time: the kubelet rotates the projected token
                with open(self.token_file) as f:
                    headers["Authorization"] = f"Bearer {f.read().strip()}"
            context = ssl.create_default_context(cafile=self.ca_cert) if self.url.startswith("https") else None
            req = request.Request(self.url, data=body, headers=headers, method="POST")
            with request.urlopen(req, timeout=TIMEOUT_S, context=context) as resp:
                resp.read()
            return True
        except (OSError, ValueError) as exc:  # the endpoint is best effort: never stop training for it
            log.warning("could not send the trainer status to %s: %s", self.url, exc)
            return False
