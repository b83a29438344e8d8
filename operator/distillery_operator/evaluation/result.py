"""The evaluation's result: per answer (logged), and the compact summary the runner writes for the operator
(the Job's termination message, at most 4 KiB) — written by `EvalResult.to_json`, read back by
`parse_summary`, so both sides agree on one format (camelCase, as DistilledModel status.rollout)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

RESULT_LIMIT_BYTES = 4096  # a container's termination message: what the operator reads back


@dataclass(frozen=True)
class ItemResult:
    """One answer to one example in one repeat (per-item detail: logged, not in the compact result)."""

    repeat: int
    line: int
    score: float
    answer: str | None
    expected: str
    latency_s: float | None
    error: str | None = None


@dataclass
class EvalResult:
    model: str
    scorer: str
    examples: int
    repeats: int
    score: float  # mean over repeats
    score_std: float  # sample standard deviation over repeats (0 with one repeat)
    scores: list[float]  # per repeat
    latency_s: dict[str, float | None]  # p50/p90/p99 of successful requests
    requests: int
    errors: int
    duration_s: float
    first_error: str | None = None
    min_score: float | None = None
    passed: bool | None = None  # None: no --min-score given
    items: list[ItemResult] = field(default_factory=list, repr=False)

    def to_json(self) -> str:
        """The compact result (camelCase as in DistilledModel status.rollout.lastAnalysis), within
        RESULT_LIMIT_BYTES: per-repeat scores and the error text give way first if it would not fit."""
        doc: dict[str, Any] = {
            "model": self.model, "scorer": self.scorer, "examples": self.examples, "repeats": self.repeats,
            "score": round(self.score, 6), "scoreStdDev": round(self.score_std, 6),
            "scores": [round(s, 6) for s in self.scores],
            "latencySeconds": {k: None if v is None else round(v, 4) for k, v in self.latency_s.items()},
            "requests": self.requests, "errors": self.errors, "durationSeconds": round(self.duration_s, 3),
            "minScore": self.min_score, "passed": self.passed,
        }
        if self.first_error:
            doc["firstError"] = self.first_error[:300]
        text = json.dumps(doc, separators=(",", ":"))
        if len(text) > RESULT_LIMIT_BYTES:
            doc.pop("scores")
            doc.pop("firstError", None)
            text = json.dumps(doc, separators=(",", ":"))
        return text


@dataclass(frozen=True)
class EvalSummary:
    """The compact result as the operator reads it."""

    model: str
    scorer: str
    examples: int
    repeats: int
    score: float
    score_std: float
    scores: tuple[float, ...] | None  # None when they were left out to fit
    latency_s: dict[str, float | None]
    requests: int
    errors: int
    duration_s: float
    min_score: float | None
    passed: bool | None
    first_error: str | None


def _number(doc: dict[str, Any], key: str, optional: bool = False) -> float | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"evaluation result: {key!r} must be a number, got {json.dumps(value)}")
    return float(value)


def parse_summary(text: str) -> EvalSummary:
    """The summary `distillery-eval` wrote; ValueError with what is wrong when it is not one."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"evaluation result is not JSON ({exc.msg}): {text[:200]!r}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"evaluation result must be a JSON object, got {text[:200]!r}")
    latency = doc.get("latencySeconds")
    if not isinstance(latency, dict):
        raise ValueError("evaluation result: 'latencySeconds' must be an object")
    scores = doc.get("scores")
    if scores is not None and not (isinstance(scores, list)
                                   and all(isinstance(s, int | float) for s in scores)):
        raise ValueError("evaluation result: 'scores' must be a list of numbers")
    passed = doc.get("passed")
    if passed is not None and not isinstance(passed, bool):
        raise ValueError(f"evaluation result: 'passed' must be true, false or null, got {json.dumps(passed)}")
    counts = {key: _number(doc, key) for key in ("examples", "repeats", "requests", "errors")}
    return EvalSummary(
        model=str(doc.get("model", "")), scorer=str(doc.get("scorer", "")),
        examples=int(counts["examples"] or 0), repeats=int(counts["repeats"] or 0),
        score=float(_number(doc, "score") or 0.0), score_std=float(_number(doc, "scoreStdDev") or 0.0),
        scores=None if scores is None else tuple(float(s) for s in scores),
        latency_s={k: _number(latency, k, optional=True) for k in ("p50", "p90", "p99")},
        requests=int(counts["requests"] or 0), errors=int(counts["errors"] or 0),
        duration_s=float(_number(doc, "durationSeconds") or 0.0),
        min_score=_number(doc, "minScore", optional=True), passed=passed,
        first_error=doc.get("firstError") if isinstance(doc.get("firstError"), str) else None,
    )
