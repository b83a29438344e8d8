"""The rollout state machine (distillery_operator.rollout), pure: specs, statuses, measurements and a clock in."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from distillery_operator.api import DistilledModelSpec
from distillery_operator.monitoring.prometheus import SloMeasurement
from distillery_operator.rollout import EvaluationOutcome, Observed, decide

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
GOOD = SloMeasurement(p99_latency_seconds=0.8, error_rate=0.001, tokens_per_second=50.0, requests_per_second=5.0)


def spec(**rollout: Any) -> DistilledModelSpec:
    return DistilledModelSpec.model_validate({
        "model": {"uri": "pvc://models/student"}, "deploymentMode": "Knative",
        "rollout": {"steps": [10, 50], **rollout},
    })


ANALYSIS = {"interval": "60s", "slo": {"p99LatencySeconds": 2.0, "maxErrorRate": 0.01}}
EVALUATION = {"dataset": {"uri": "pvc://evals/gsm8k.jsonl"}, "minScore": 0.6, "maxRegression": 0.02}


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def started(s: DistilledModelSpec) -> dict[str, Any]:
    """A rollout of candidate 'new' over stable 'old', started at T0."""
    first = decide(s, None, "old", {"v": "old"}, T0)
    assert first.status["phase"] == "Idle" and first.canary_percent is None
    d = decide(s, first.status, "new", {"v": "new"}, T0)
    assert d.outcome == "started"
    if d.status["phase"] == "Progressing":  # the candidate is ready at once: step 1's clock starts
        d = decide(s, d.status, "new", {"v": "new"}, T0)
        assert d.status["candidateReadyAt"] == "2026-01-01T00:00:00Z"
    return d.status


def test_first_sight_is_idle_and_stable():
    d = decide(spec(), None, "k1", {"v": 1}, T0)
    assert d.status["stable"] == "k1" and d.serve == "candidate" and d.canary_percent is None and d.event is None


def test_good_numbers_step_then_promote():
    s = spec(analysis=ANALYSIS)
    status = started(s)
    assert (status["phase"], status["step"], status["trafficPercent"]) == ("Progressing", 1, 10)
    held = decide(s, status, "new", {"v": "new"}, at(30))
    assert held.canary_percent == 10 and held.need is None and held.requeue_after == pytest.approx(30)
    due = decide(s, status, "new", {"v": "new"}, at(60))
    assert due.need == "slo" and due.status == status  # nothing moves without a measurement
    step2 = decide(s, status, "new", {"v": "new"}, at(60), Observed(slo=GOOD))
    assert (step2.status["step"], step2.canary_percent, step2.status["lastAnalysis"]["passed"]) == (2, 50, True)
    assert step2.status["lastAnalysis"]["p99LatencySeconds"] == 0.8
    promoted = decide(s, step2.status, "new", {"v": "new"}, at(120), Observed(slo=GOOD))
    assert promoted.outcome == "promoted" and promoted.canary_percent is None
    assert promoted.status["stable"] == "new" and promoted.status["stableSpec"] == {"v": "new"}
    # Afterwards: the candidate is stable, nothing more happens.
    after = decide(s, promoted.status, "new", {"v": "new"}, at(500))
    assert after.outcome is None and after.canary_percent is None and after.status["phase"] == "Promoted"


def test_high_p99_rolls_back_with_the_numbers():
    s = spec(analysis=ANALYSIS)
    status = started(s)
    slow = SloMeasurement(3.1, 0.0, 40.0, 5.0)
    d = decide(s, status, "new", {"v": "new"}, at(61), Observed(slo=slow))
    assert d.outcome == "rolled_back" and d.serve == "stable" and d.canary_percent is None
    assert d.status["phase"] == "RolledBack" and d.status["trafficPercent"] == 0
    assert "P99 latency 3.1s > 2s" in d.status["message"] and d.event[0] == "Warning"
    assert d.status["lastAnalysis"]["passed"] is False and d.status["lastAnalysis"]["p99LatencySeconds"] == 3.1
    # Stays rolled back (the stable spec serves) until the spec changes again; then a new rollout starts.
    again = decide(s, d.status, "new", {"v": "new"}, at(1000))
    assert again.serve == "stable" and again.outcome is None
    newer = decide(s, d.status, "newer", {"v": "newer"}, at(1000))
    assert newer.outcome == "started" and newer.status["candidate"] == "newer" and newer.status["stable"] == "old"


@pytest.mark.parametrize(("measured", "fragment"), [
    (SloMeasurement(None, None, None, None), "no P99 latency"),
    (SloMeasurement(0.5, 0.2, 10.0, 5.0), "error rate 0.2 > 0.01"),
])
def test_missing_or_bad_numbers_fail(measured, fragment):
    s = spec(analysis=ANALYSIS)
    d = decide(s, started(s), "new", {}, at(60), Observed(slo=measured))
    assert d.outcome == "rolled_back" and fragment in d.status["message"]


def test_no_5xx_series_with_traffic_is_zero_errors():
    s = spec(analysis=ANALYSIS)
    d = decide(s, started(s), "new", {}, at(60), Observed(slo=SloMeasurement(0.5, None, 10.0, 5.0)))
    assert d.outcome is None and d.status["step"] == 2


def test_min_tokens_per_second():
    s = spec(analysis={"interval": "10s", "slo": {"minTokensPerSecond": 100}})
    d = decide(s, started(s), "new", {}, at(10), Observed(slo=GOOD))
    assert d.outcome == "rolled_back" and "tokens/s 50 < 100" in d.status["message"]


def test_evaluation_gate_runs_before_traffic():
    s = spec(analysis={**ANALYSIS, "evaluation": EVALUATION})
    status = started(s)
    assert (status["phase"], status["trafficPercent"]) == ("Evaluating", 0)
    waiting = decide(s, status, "new", {}, at(500))
    assert waiting.need == "evaluation" and waiting.canary_percent == 0
    good = decide(s, status, "new", {}, at(5), Observed(evaluation=EvaluationOutcome(0.7, 0.01, 0.71)))
    assert (good.status["phase"], good.status["step"], good.canary_percent) == ("Progressing", 1, 10)
    assert good.status["lastAnalysis"]["score"] == 0.7


@pytest.mark.parametrize(("result", "fragment"), [
    (EvaluationOutcome(0.5, 0.01, 0.5), "score 0.5 < minScore 0.6"),
    (EvaluationOutcome(0.65, 0.01, 0.8), "regresses 0.15"),
    (EvaluationOutcome(error="Job failed: BackoffLimitExceeded"), "BackoffLimitExceeded"),
])
def test_failing_evaluation_rolls_back_before_traffic(result, fragment):
    s = spec(analysis={**ANALYSIS, "evaluation": EVALUATION})
    d = decide(s, started(s), "new", {}, at(5), Observed(evaluation=result))
    assert d.outcome == "rolled_back" and fragment in d.status["message"] and d.status["trafficPercent"] == 0


def test_steps_without_analysis_advance_on_the_timer():
    s = spec()
    status = started(s)
    assert decide(s, status, "new", {}, at(119)).status["step"] == 1
    step2 = decide(s, status, "new", {}, at(120))
    assert step2.status["step"] == 2 and step2.status["lastAnalysis"]["gate"] == "timer"
    assert decide(s, step2.status, "new", {}, at(240)).outcome == "promoted"


def test_repeating_a_decision_never_takes_two_steps():
    """A restart or a stale event re-runs decide on the written status: the step clock restarted with it."""
    s = spec(analysis=ANALYSIS)
    step2 = decide(s, started(s), "new", {}, at(60), Observed(slo=GOOD)).status
    again = decide(s, step2, "new", {}, at(61), Observed(slo=GOOD))
    assert again.status == step2 and again.requeue_after == pytest.approx(59)


def test_a_new_spec_mid_rollout_restarts_against_the_same_stable():
    s = spec(analysis=ANALYSIS)
    step2 = decide(s, started(s), "new", {}, at(60), Observed(slo=GOOD)).status
    d = decide(s, step2, "newer", {}, at(70))
    assert d.outcome == "started" and d.status["step"] == 1 and d.status["stable"] == "old"


def test_spec_back_to_stable_abandons_the_rollout():
    s = spec(analysis=ANALYSIS)
    d = decide(s, started(s), "old", {"v": "old2"}, at(10))
    assert d.status["phase"] == "Idle" and d.canary_percent is None and d.status["stableSpec"] == {"v": "old2"}


def test_step_one_starts_when_the_candidate_is_ready():
    s = spec(analysis=ANALYSIS)
    first = decide(s, None, "old", {}, T0)
    begun = decide(s, first.status, "new", {}, T0).status
    loading = decide(s, begun, "new", {}, at(600), Observed(candidate_ready=False))
    assert loading.status == begun and loading.canary_percent == 10 and loading.need is None
    ready = decide(s, begun, "new", {}, at(700), Observed(candidate_ready=True))
    assert ready.status["stepStartedAt"] == ready.status["candidateReadyAt"] == "2026-01-01T00:11:40Z"
    assert decide(s, ready.status, "new", {}, at(730)).requeue_after == pytest.approx(30)


def test_a_candidate_never_ready_rolls_back():
    s = spec(analysis=ANALYSIS)  # startupTimeoutSeconds defaults to 900
    begun = decide(s, decide(s, None, "old", {}, T0).status, "new", {}, T0).status
    d = decide(s, begun, "new", {}, at(901), Observed(candidate_ready=False))
    assert d.outcome == "rolled_back" and "not ready within startupTimeoutSeconds (900s)" in d.status["message"]


def test_a_new_rollout_inherits_no_revision_and_starts_after_the_latest():
    s = spec()
    status = {**started(s), "candidateRevision": "m-predictor-00002", "stableRevision": "m-predictor-00001"}
    d = decide(s, status, "newer", {"v": "newer"}, at(5), Observed(latest_revision="m-predictor-00002"))
    assert d.outcome == "started" and d.status["candidate"] == "newer"
    assert "candidateRevision" not in d.status and d.status["baseRevision"] == "m-predictor-00002"


def test_an_abandon_holds_on_the_stable_revision_like_a_rollback():
    s = spec()
    status = {**started(s), "candidateRevision": "m-predictor-00002"}
    d = decide(s, status, "old", {"v": "old"}, at(5))
    assert d.status["phase"] == "Idle" and d.serve == "stable" and d.event[1] == "RolloutAbandoned"
    assert decide(s, d.status, "old", {"v": "old"}, at(6)).serve == "stable"  # until the reconciler clears it
