"""Pure parts of the prefix_cache section: the server command, the /metrics counters, the summary and its
targets (no server)."""

from __future__ import annotations

from bench import report
from bench.prefix_bench import PREFIX, QUESTIONS, _prefix_counters, summarize
from bench.run import Settings


def _run(ttfts: list[float], texts: list[str]) -> dict:
    return {"requests": [{"ttft_s": t, "text": x, "prompt_tokens": 1000 + i}
                         for i, (t, x) in enumerate(zip(ttfts, texts, strict=True))]}


def test_summary_ratio_and_identical_outputs() -> None:
    out = summarize(_run([2.0, 0.2], ["a", "b"]), _run([2.0, 1.9], ["a", "b"]))
    assert out["second_over_first"] == 0.1 and out["cache_off_second_over_first"] == 0.95
    assert out["identical_outputs"] is True and out["prompt_tokens"] == [1000, 1001]
    assert summarize(_run([2.0, 0.2], ["a", "b"]), _run([2.0, 1.9], ["a", "c"]))["identical_outputs"] is False
    failed = summarize(_run([2.0, 0.2], ["a", "b"]), {"error": "RuntimeError: did not start"})
    assert failed["identical_outputs"] is None and failed["cache_off_second_over_first"] is None
    targets = {t["target"]: t for t in report.evaluate_targets({"prefix_cache": {"int8": out}})}
    assert targets["prefix cache (int8): 2nd TTFT / 1st TTFT, ~1,000-token shared prefix"]["met"] is True
    assert targets["prefix cache (int8): identical outputs with the cache on and off"]["met"] is True
    slow = summarize(_run([2.0, 0.8], ["a", "b"]), _run([2.0, 1.9], ["a", "b"]))
    targets = {t["target"]: t for t in report.evaluate_targets({"prefix_cache": {"int4": slow}})}
    assert targets["prefix cache (int4): 2nd TTFT / 1st TTFT, ~1,000-token shared prefix"]["met"] is False


def test_prefix_counters_from_the_metrics_text() -> None:
    text = ('# HELP distillery_prefix_cache_hits_total x\n'
            'distillery_prefix_cache_queries_total{model_name="m"} 2044.0\n'
            'distillery_prefix_cache_hits_total{model_name="m"} 1008.0\n'
            'distillery_prefix_cache_blocks{model_name="m"} 127.0\n')
    assert _prefix_counters(text) == {"queried_tokens": 2044.0, "hit_tokens": 1008.0}


def test_the_requests_share_a_long_prefix_and_the_servers_parse() -> None:
    assert len(PREFIX) > 4000 and len(QUESTIONS) == 2 and QUESTIONS[0] != QUESTIONS[1]
    import model_runtime.__main__ as runtime_main
    from bench.run import ST_0P5B, Bench

    cmd = Bench(Settings(), {})._ours_cmd(ST_0P5B, "m", 8080, "int8", max_batch=1, max_queue=4)
    for flag, expected in (("--enable_prefix_caching=True", True), ("--enable_prefix_caching=False", False)):
        assert runtime_main.build_parser().parse_args([*cmd[3:], flag]).enable_prefix_caching is expected
    assert Settings.quick().prefix_modes == ("int8",)
