"""Pure parts of the itl_long_prefill and guidellm sections: the ITL window figures and the users sweep's
summary (no server, no guidellm process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import guidellm_run
from bench.itl_bench import itl_figures


def test_itl_figures_count_only_intervals_inside_the_window() -> None:
    # stream 0 ticks every 20 ms, with one 100 ms gap (a prefill step) from 1.00 to 1.10; stream 1 every 25 ms
    s0 = [0.5 + 0.02 * i for i in range(26)] + [1.10 + 0.02 * i for i in range(10)]
    s1 = [0.5 + 0.025 * i for i in range(40)]
    fig = itl_figures([s0, s1], 0.9, 1.2)
    inside = [b - a for t in (s0, s1) for a, b in zip(t, t[1:], strict=False) if a >= 0.9 and b <= 1.2]
    assert fig["samples"] == len(inside)
    assert fig["max_ms"] == pytest.approx(100.0)
    assert fig["median_ms"] == pytest.approx(25.0, abs=5.01)
    assert fig["p99_over_median"] > 2  # the 100 ms gap shows at p99 of so few samples
    assert itl_figures([s0], 5.0, 6.0) == {"samples": 0, "median_ms": None, "p99_ms": None, "max_ms": None,
                                           "p99_over_median": None}


def test_guidellm_sweep_reports_the_most_over_the_fewest_users(monkeypatch, tmp_path: Path) -> None:
    calls = []

    def fake(base_url, tokenizer_dir, out_dir, *, streams, seconds, prompt_tokens, output_tokens, seed):
        calls.append((streams, out_dir.name, seconds, prompt_tokens, output_tokens, seed))
        return {"output_tokens_per_s": 30.0 * (1 + streams // 2), "ttft_ms_median": 100.0 * streams,
                "itl_ms_median": 20.0}

    monkeypatch.setattr(guidellm_run, "run_guidellm", fake)
    out = guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, levels=(1, 8), seconds=40.0)
    # each level its own prompts (its own seed): no level is served from the prefix cache an earlier one filled
    assert calls == [(1, "1u", 40.0, 256, 128, 1001), (8, "8u", 40.0, 256, 128, 1008)]
    assert out["output_tokens_per_s"] == {"1": 30.0, "8": 150.0}
    assert out["output_tokens_per_s_8u_over_1u"] == 5.0
    assert out["ttft_ms_median"] == {"1": 100.0, "8": 800.0}
    assert "error" not in out


def test_guidellm_sweep_rounds_take_the_levels_in_turn_and_average_them(monkeypatch, tmp_path: Path) -> None:
    calls = []
    rates = iter([40.0, 120.0, 50.0, 160.0])  # round 0: 1u, 8u; round 1: 1u, 8u

    def fake(base_url, tokenizer_dir, out_dir, *, streams, seconds, prompt_tokens, output_tokens, seed):
        calls.append((streams, out_dir.name, seed))
        return {"output_tokens_per_s": next(rates), "ttft_ms_median": 100.0 * streams + seed % 100,
                "itl_ms_median": 20.0}

    monkeypatch.setattr(guidellm_run, "run_guidellm", fake)
    out = guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, levels=(1, 8), rounds=2)
    # the levels alternate (a slow stretch of the machine lands on both), each run its own prompts and report
    assert calls == [(1, "1u", 1001), (8, "8u", 1008), (1, "1u-r1", 1101), (8, "8u-r1", 1108)]
    assert out["output_tokens_per_s"] == {"1": 45.0, "8": 140.0}
    assert out["output_tokens_per_s_8u_over_1u"] == round(140.0 / 45.0, 2)  # the means' ratio, not a round's
    assert out["output_tokens_per_s_8u_over_1u_per_round"] == [3.0, 3.2]
    assert out["ttft_ms_median"] == {"1": 101.0, "8": 808.0}
    assert out["rounds"] == 2 and [len(r) for r in out["runs"].values()] == [2, 2]
    with pytest.raises(ValueError, match="rounds"):
        guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, rounds=0)
    with pytest.raises(ValueError, match="once"):
        guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, levels=(1, 8, 1))


def test_guidellm_sweep_keeps_the_good_rounds_of_a_level_that_failed_once(monkeypatch, tmp_path: Path) -> None:
    runs = iter([{"output_tokens_per_s": 40.0}, {"output_tokens_per_s": 120.0},
                 {"output_tokens_per_s": 50.0}, {"error": "guidellm exit 1"}])
    monkeypatch.setattr(guidellm_run, "run_guidellm", lambda *a, **k: next(runs))
    out = guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, levels=(1, 8), rounds=2)
    assert out["output_tokens_per_s"] == {"1": 45.0, "8": None} and out["output_tokens_per_s_8u_over_1u"] is None
    assert out["output_tokens_per_s_8u_over_1u_per_round"] == [3.0, None]
    assert out["error"] == "8 users: guidellm exit 1"


def test_guidellm_sweep_carries_a_levels_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(guidellm_run, "run_guidellm", lambda *a, streams, **k: (
        {"error": "guidellm exit 1"} if streams == 8 else {"output_tokens_per_s": 30.0}))
    out = guidellm_run.run_guidellm_sweep("http://x", tmp_path, tmp_path, levels=(1, 8))
    assert out["output_tokens_per_s_8u_over_1u"] is None
    assert out["error"] == "8 users: guidellm exit 1"


def test_guidellm_command_passes_the_seed_and_the_warmup(tmp_path: Path) -> None:
    cmd = guidellm_run.guidellm_command("guidellm", "http://x", tmp_path, tmp_path / "o.json", streams=8, seconds=60,
                                        prompt_tokens=256, output_tokens=128, seed=1008)
    assert cmd[cmd.index("--seed") + 1] == "kind=static,value=1008"
    assert cmd[cmd.index("--profile") + 1] == "kind=concurrent,streams=8,warmup=0.1"
    # a few prompts ready per stream, not guidellm's 4,096 tokenized through the run on the server's CPUs
    assert cmd[cmd.index("--data-loader") + 1] == "kind=pytorch,prefetch_factor=32"


def test_guidellm_summary_counts_every_requests_tokens_and_the_completed_ones_apart() -> None:
    """Total output tokens/s is guidellm's "total" (requests still streaming at the window's end included), not
    the completed requests' alone; latencies stay the completed requests'."""
    def dist(mean: float, median: float | None = None) -> dict[str, Any]:
        return {"mean": mean, "median": median if median is not None else mean, "percentiles": {"p95": 2 * mean}}

    report = {"benchmarks": [{"metrics": {
        "request_totals": {"successful": 29, "errored": 0, "incomplete": 7, "total": 36},
        "output_tokens_per_second": {"successful": dist(68.18), "incomplete": dist(7.0), "total": dist(75.2)},
        "requests_per_second": {"successful": dist(0.52)},
        "time_to_first_token_ms": {"successful": dist(900.0, 800.0), "total": dist(5000.0)},
        "inter_token_latency_ms": {"successful": dist(60.0, 55.0)},
        "request_latency": {"successful": dist(14.0, 13.5)}}}]}
    out = guidellm_run.summarize(report)
    assert (out["output_tokens_per_s"], out["output_tokens_per_s_completed"]) == (75.2, 68.18)
    assert (out["requests_completed"], out["requests_incomplete"]) == (29, 7)
    assert (out["ttft_ms_median"], out["ttft_ms_p95"], out["itl_ms_median"]) == (800.0, 1800.0, 55.0)


def test_guidellm_seconds_flag_sets_each_levels_window(monkeypatch, tmp_path: Path) -> None:
    """--guidellm-seconds replaces both the default and the 60-s floor (a slow CPU needs longer, a quick check
    less); a window of 0 or less is refused before anything runs."""
    from bench import run

    seen: list[float] = []
    monkeypatch.setattr(run.Bench, "guidellm", lambda self: seen.append(
        max(self.s.guidellm_seconds, self.s.guidellm_min_seconds)))
    monkeypatch.setattr(run, "print_report", lambda results: None)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / ".complete").touch()
    monkeypatch.setattr(run, "ST_0P5B", tmp_path / "st")
    for argv, want in ((["--guidellm-seconds", "240"], 240.0), (["--guidellm-seconds", "20"], 20.0), ([], 60.0)):
        run.main(["--only", "guidellm", "--out", str(tmp_path / "r.json"), *argv])
        assert seen.pop() == want
    with pytest.raises(SystemExit, match="guidellm-seconds"):
        run.main(["--only", "guidellm", "--out", str(tmp_path / "r.json"), "--guidellm-seconds", "0"])
