"""Progress posted to the TrainJob's status endpoint as Kubeflow Trainer's progress feature (KEP-2779) takes
it: the injected URL and bearer token, the metric names the operator reads, rate-limited, never fatal.
A local HTTP server stands in for the Trainer controller."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from distillery_contract.distillation import PROGRESS_METRICS
from distillery_trainer.trainer_status import CA_CERT_ENV, TOKEN_ENV, URL_ENV, TrainerStatusPoster, payload


@pytest.fixture
def controller():
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"),
                             "body": json.loads(body)})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def test_the_status_is_posted_with_the_token_and_the_operators_metric_names(controller, tmp_path: Path):
    base, received = controller
    (tmp_path / "token").write_text("jwt-1\n")
    url = f"{base}/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/r1/status"
    poster = TrainerStatusPoster({URL_ENV: url, TOKEN_ENV: str(tmp_path / "token"), CA_CERT_ENV: "/unused"},
                                 min_interval_s=3600)
    assert poster.post(5, 20, 1.25, kl=0.5)
    assert not poster.post(6, 20, 1.2)  # within the interval: skipped
    (tmp_path / "token").write_text("jwt-2")  # rotated by the kubelet
    assert poster.post(20, 20, 1.0, final=True)  # the last one always goes
    assert [r["path"] for r in received] == ["/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/r1/status"] * 2
    assert [r["auth"] for r in received] == ["Bearer jwt-1", "Bearer jwt-2"]
    first = received[0]["body"]["trainerStatus"]
    assert first["progressPercentage"] == 25
    metrics = {m["name"]: m["value"] for m in first["metrics"]}
    step, total, loss = PROGRESS_METRICS
    assert metrics == {step: "5", total: "20", loss: "1.25", "kl": "0.5"}
    assert first["lastUpdatedTime"].endswith("Z")
    assert received[1]["body"]["trainerStatus"]["progressPercentage"] == 100


def test_nothing_is_sent_without_the_injected_url():
    poster = TrainerStatusPoster({})
    assert not poster.enabled and not poster.post(1, 2, 0.5, final=True)


def test_an_unreachable_endpoint_does_not_stop_training(caplog):
    poster = TrainerStatusPoster({URL_ENV: "http://127.0.0.1:9/status"})  # discard port: refused
    assert poster.post(1, 2, 0.5, final=True) is False
    assert "could not send the trainer status" in caplog.text


def test_remaining_time_is_estimated_from_the_pace():
    status = payload(10, 40, 2.0, elapsed_s=100.0, extra={})["trainerStatus"]
    assert status["estimatedRemainingSeconds"] == 300 and status["progressPercentage"] == 25
    assert "estimatedRemainingSeconds" not in payload(0, 40, None, 1.0, {})["trainerStatus"]
