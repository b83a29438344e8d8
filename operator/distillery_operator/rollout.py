"""The stepped rollout of a DistilledModel's served model, as a pure state machine.

`decide(plan, previous, key, spec, now, observed)` -> `Decision`: what status.rollout becomes, which spec the
InferenceService serves (the user's — the candidate — or the stable one kept in status) with which
canaryTrafficPercent, what the reconciler must observe before the next judgement (an evaluation result,
the step's SLO figures), an Event to post and an outcome to count. No I/O and no clock: the reconciler
brings the measurements and `now`, so an operator restarted mid-rollout resumes from status alone.

Lifecycle (the key is a hash of the rendered model server, so only a change of what is served starts one):
    Idle/Promoted/RolledBack --new key--> Evaluating (evaluation gate, 0% traffic) --pass--> Progressing
    step 1 .. step N (each held `interval`, then judged on the candidate's SLOs, or just timed) --pass-->
    Promoted (the candidate is the new stable); any failed gate --> RolledBack (the stable spec serves).
A step advances only once its interval has passed since `stepStartedAt`, and that timestamp moves with it,
so repeating a reconcile (a restart, a stale event) can never take two steps.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .api import DistilledModelSpec, RolloutPhase, duration_seconds
from .monitoring.prometheus import SloMeasurement

DEFAULT_INTERVAL_S = 120.0
IN_PROGRESS = frozenset({RolloutPhase.EVALUATING.value, RolloutPhase.PROGRESSING.value})
# Phases after which a candidate's revision may still be Knative's latest ready one (abandoned, rolled back).
RESTORABLE = frozenset({RolloutPhase.IDLE.value, RolloutPhase.ROLLED_BACK.value})


@dataclass(frozen=True)
class EvaluationOutcome:
    """The evaluation Job's result: scores of candidate and stable, or why the Job failed."""

    score: float | None = None
    score_std_dev: float | None = None
    stable_score: float | None = None
    error: str | None = None  # the Job failed: a failed gate with this reason


@dataclass(frozen=True)
class Observed:
    """What the reconciler measured for this decision (None: not measured)."""

    evaluation: EvaluationOutcome | None = None
    slo: SloMeasurement | None = None
    candidate_ready: bool = True  # the candidate revision exists and is ready (KServe status)
    latest_revision: str | None = None  # the InferenceService's latestCreatedRevision (KServe status)


@dataclass
class Decision:
    status: dict[str, Any]  # the new status.rollout (wire format)
    serve: Literal["candidate", "stable"] = "candidate"
    canary_percent: int | None = None  # canaryTrafficPercent on the InferenceService (None: no canary)
    need: Literal["evaluation", "slo"] | None = None  # observe this, then decide again
    requeue_after: float | None = None  # seconds until the current step is due
    event: tuple[str, str, str] | None = None  # (type, reason, message)
    outcome: str | None = None  # started | promoted | rolled_back (for the metric)
    reasons: list[str] = field(default_factory=list)


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def fmt_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def interval_seconds(spec: DistilledModelSpec) -> float:
    analysis = spec.rollout.analysis
    return duration_seconds(analysis.interval) if analysis is not None else DEFAULT_INTERVAL_S


def slo_gated(spec: DistilledModelSpec) -> bool:
    """Whether the steps are judged on measured SLOs (else they advance on the timer)."""
    analysis = spec.rollout.analysis
    if analysis is None:
        return False
    slo = analysis.slo
    return any(v is not None for v in (slo.p99_latency_seconds, slo.max_error_rate, slo.min_tokens_per_second))


def judge_slo(spec: DistilledModelSpec, m: SloMeasurement, window: str) -> list[str]:
    """Why the measured figures fail the SLOs (empty: they pass). Missing data fails: nothing is promoted
    without a result."""
    assert spec.rollout.analysis is not None
    slo = spec.rollout.analysis.slo
    reasons = []
    no_traffic = not m.requests_per_second
    if slo.p99_latency_seconds is not None:
        if m.p99_latency_seconds is None:
            reasons.append(f"no P99 latency for the candidate over {window} (no traffic reached it)")
        elif m.p99_latency_seconds > slo.p99_latency_seconds:
            reasons.append(f"P99 latency {m.p99_latency_seconds:.3g}s > {slo.p99_latency_seconds:g}s")
    if slo.max_error_rate is not None:
        # No 5xx series at all while requests were served is an error rate of 0, not missing data.
        rate = m.error_rate if m.error_rate is not None or no_traffic else 0.0
        if rate is None:
            reasons.append(f"no error rate for the candidate over {window} (no traffic reached it)")
        elif rate > slo.max_error_rate:
            reasons.append(f"error rate {rate:.3g} > {slo.max_error_rate:g}")
    if slo.min_tokens_per_second is not None:
        if m.tokens_per_second is None:
            reasons.append(f"no tokens/s for the candidate over {window} (no traffic reached it)")
        elif m.tokens_per_second < slo.min_tokens_per_second:
            reasons.append(f"tokens/s {m.tokens_per_second:.3g} < {slo.min_tokens_per_second:g}")
    return reasons


def judge_evaluation(spec: DistilledModelSpec, result: EvaluationOutcome) -> list[str]:
    assert spec.rollout.analysis is not None and spec.rollout.analysis.evaluation is not None
    gate = spec.rollout.analysis.evaluation
    if result.error:
        return [f"evaluation failed: {result.error}"]
    if result.score is None:
        return ["evaluation reported no score"]
    reasons = []
    if gate.min_score is not None and result.score < gate.min_score:
        reasons.append(f"score {result.score:.3g} < minScore {gate.min_score:g}")
    if gate.max_regression is not None:
        if result.stable_score is None:
            reasons.append("no score for the stable revision to compare with (maxRegression)")
        elif result.stable_score - result.score > gate.max_regression:
            reasons.append(f"score {result.score:.3g} regresses {result.stable_score - result.score:.3g} from the "
                           f"stable {result.stable_score:.3g} > maxRegression {gate.max_regression:g}")
    return reasons


def _analysis(now: datetime.datetime, gate: str, passed: bool, reasons: list[str],
              slo: SloMeasurement | None = None, evaluation: EvaluationOutcome | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"time": fmt_time(now), "gate": gate, "passed": passed, "reasons": reasons}
    if slo is not None:
        out.update(p99LatencySeconds=slo.p99_latency_seconds, errorRate=slo.error_rate,
                   tokensPerSecond=slo.tokens_per_second)
    if evaluation is not None:
        out.update(score=evaluation.score, scoreStdDev=evaluation.score_std_dev, stableScore=evaluation.stable_score)
    return {k: v for k, v in out.items() if v is not None}


def decide(
    spec: DistilledModelSpec,
    previous: Mapping[str, Any] | None,
    key: str,
    spec_json: dict[str, Any],
    now: datetime.datetime,
    observed: Observed | None = None,
) -> Decision:
    """The next rollout state for a model whose rendered model server hashes to `key` (spec.rollout.steps set)."""
    assert spec.rollout.steps, "decide() is for stepped rollouts"
    steps = spec.rollout.steps
    observed = observed or Observed()
    prev = dict(previous or {})
    phase = prev.get("phase")
    stable = prev.get("stable")

    if not phase or not stable:  # first sight: what serves now is stable
        return Decision({"phase": RolloutPhase.IDLE.value, "stable": key, "stableSpec": spec_json,
                         "message": "serving the spec; a change of the served model starts a rollout"})
    if key == stable:
        new = {**prev, "stableSpec": spec_json}  # non-model fields (replicas, ...) follow the spec
        if phase in IN_PROGRESS:  # the spec went back to the stable model: nothing left to roll out
            new.update(phase=RolloutPhase.IDLE.value, trafficPercent=None, step=None,
                       message="the spec returned to the stable model; rollout abandoned")
            # As after a rollback: until the reverted spec's revision is ready, Knative's latest ready
            # revision is the abandoned candidate's, so the reconciler holds traffic on the stable one.
            return Decision(new, serve="stable", event=("Normal", "RolloutAbandoned", new["message"]))
        if phase in RESTORABLE and (new.get("candidateRevision") or new.get("baseRevision")):
            return Decision(new, serve="stable")  # still restoring, perhaps: the reconciler knows
        return Decision(new)
    if phase == RolloutPhase.ROLLED_BACK.value and key == prev.get("candidate"):
        return Decision(prev, serve="stable")  # stays rolled back until the spec changes again
    if phase not in IN_PROGRESS or key != prev.get("candidate"):
        return _start(spec, prev, key, now, observed.latest_revision)

    if phase == RolloutPhase.EVALUATING.value:
        if observed.evaluation is None:
            return Decision(prev, canary_percent=0, need="evaluation")
        reasons = judge_evaluation(spec, observed.evaluation)
        analysis = _analysis(now, "evaluation", not reasons, reasons, evaluation=observed.evaluation)
        if reasons:
            return _rollback(prev, analysis, reasons, "evaluation")
        return _step({**prev, "candidateReadyAt": fmt_time(now)}, steps, 1, now, analysis)  # it was scored

    # Progressing: the first step's clock starts once the candidate is ready (a big model loads for minutes);
    # then each step is held for its interval and judged.
    step = int(prev.get("step") or 1)
    traffic = steps[min(step, len(steps)) - 1]
    started = parse_time(prev.get("stepStartedAt")) or now
    if not prev.get("candidateReadyAt"):
        if observed.candidate_ready:
            ready = {**prev, "candidateReadyAt": fmt_time(now), "stepStartedAt": fmt_time(now)}
            return Decision(ready, canary_percent=traffic, requeue_after=interval_seconds(spec))
        if (now - started).total_seconds() > spec.startup_timeout_seconds:
            reasons = [f"the candidate revision was not ready within startupTimeoutSeconds ({spec.startup_timeout_seconds}s)"]
            return _rollback(prev, _analysis(now, "startup", False, reasons), reasons, "startup")
        return Decision(prev, canary_percent=traffic)
    remaining = interval_seconds(spec) - (now - started).total_seconds()
    if remaining > 0:
        return Decision(prev, canary_percent=traffic, requeue_after=remaining)
    if slo_gated(spec):
        if observed.slo is None:
            return Decision(prev, canary_percent=traffic, need="slo")
        window = spec.rollout.analysis.interval  # type: ignore[union-attr]
        reasons = judge_slo(spec, observed.slo, window)
        analysis = _analysis(now, "slo", not reasons, reasons, slo=observed.slo)
        if reasons:
            return _rollback(prev, analysis, reasons, f"step {step} ({traffic}%) SLO")
    else:
        analysis = _analysis(now, "timer", True, [])
    if step >= len(steps):
        return _promote(prev, spec_json, analysis)
    return _step(prev, steps, step + 1, now, analysis)


def _start(spec: DistilledModelSpec, prev: dict[str, Any], key: str, now: datetime.datetime,
           base_revision: str | None) -> Decision:
    """A new rollout state, nothing inherited from the last one but the stable model: its candidate is
    only a revision created after `baseRevision` (the latest when it starts; mid-rollout or while a rollback
    restores, that is an earlier candidate's, which must never be taken for this one)."""
    evaluating = spec.rollout.analysis is not None and spec.rollout.analysis.evaluation is not None
    new = {
        "phase": RolloutPhase.EVALUATING.value if evaluating else RolloutPhase.PROGRESSING.value,
        "step": 0 if evaluating else 1,
        "trafficPercent": 0 if evaluating else spec.rollout.steps[0],  # type: ignore[index]
        "candidate": key,
        "stable": prev["stable"],
        "stableSpec": prev.get("stableSpec"),
        "baseRevision": base_revision,
        "startedAt": fmt_time(now),
        "stepStartedAt": fmt_time(now),
        "message": "evaluating the candidate before any traffic moves" if evaluating
        else f"step 1: {spec.rollout.steps[0]}% of traffic on the candidate",  # type: ignore[index]
    }
    return Decision(new, canary_percent=new["trafficPercent"], outcome="started",
                    event=("Normal", "RolloutStarted", f"rolling out a new model server: {new['message']}"))


def _step(prev: dict[str, Any], steps: list[int], step: int, now: datetime.datetime,
          analysis: dict[str, Any]) -> Decision:
    traffic = steps[step - 1]
    new = {**prev, "phase": RolloutPhase.PROGRESSING.value, "step": step, "trafficPercent": traffic,
           "stepStartedAt": fmt_time(now), "lastAnalysis": analysis,
           "message": f"step {step}: {traffic}% of traffic on the candidate"}
    return Decision(new, canary_percent=traffic, event=("Normal", "RolloutStep", new["message"]))


def _promote(prev: dict[str, Any], spec_json: dict[str, Any], analysis: dict[str, Any]) -> Decision:
    new = {**prev, "phase": RolloutPhase.PROMOTED.value, "step": None, "trafficPercent": 100,
           "stable": prev["candidate"], "stableSpec": spec_json, "lastAnalysis": analysis,
           "message": "the candidate passed every step and serves all traffic"}
    return Decision(new, outcome="promoted", event=("Normal", "Promoted", new["message"]))


def _rollback(prev: dict[str, Any], analysis: dict[str, Any], reasons: list[str], gate: str) -> Decision:
    message = f"{gate} gate failed: {'; '.join(reasons)}; traffic back on the stable revision"
    new = {**prev, "phase": RolloutPhase.ROLLED_BACK.value, "step": None, "trafficPercent": 0,
           "lastAnalysis": analysis, "message": message}
    return Decision(new, serve="stable", outcome="rolled_back", reasons=reasons,
                    event=("Warning", "RolledBack", message))
