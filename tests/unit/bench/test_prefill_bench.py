"""bench's prefill section: rounds merged into one median TTFT, the table, the TTFT target."""

from __future__ import annotations

from bench import report


def test_rounds_merge_into_the_median_of_every_timed_run_and_errors_are_kept() -> None:
    rounds = [{"prompt_tokens": 1000, "ttft_s_runs": [2.0, 4.0], "kernel_plan": {"prefill_kernel": "int8mm"}},
              {"error": "killed"}, {"prompt_tokens": 1000, "ttft_s_runs": [3.0], "log": "..."}]
    merged = report.merge_ttft_rounds(rounds)
    assert merged["ttft_s"] == 3.0 and merged["ttft_s_runs"] == [2.0, 3.0, 4.0]
    assert merged["prefill_tok_s"] == 333.3 and merged["rounds"] == 2 and merged["errors"] == ["killed"]
    assert "log" not in merged
    assert report.merge_ttft_rounds([{"error": "no gguf"}]) == {"error": "no gguf"}


def test_ttft_target_and_table() -> None:
    pf = {"prompt_tokens": 1000, "cpu_isa": ["avx512_bf16", "avx512_vnni"], "engines": {
        "llama.cpp/Q4_K_M": {"prompt_tokens": 1000, "ttft_s": 4.0},
        "ours/int8": {"prompt_tokens": 1000, "ttft_s": 1.6, "prefill_tok_s": 625.0, "ttft_over_llamacpp": 0.4,
                      "kernel_plan": {"prefill_kernel": "int8mm"}},
        "ours/int4": {"prompt_tokens": 1000, "ttft_s": 2.4, "ttft_over_llamacpp": 0.6,
                      "kernel_plan": {"prefill_kernel": "int8mm"}},
        "ours/int8-decode-kernels": {"error": "boom"}},
        "kernels": {"chosen": "int8mm", "why": "VNNI", "rows": [
            {"layer": "qkv", "N": 1152, "K": 896, "M": 256, "dq_int8_ms": 4.0, "dq_int8_gflop_s": 130.0,
             "int8mm_int8_ms": 1.0, "int8mm_int8_gflop_s": 528.0, "int8_speedup": 4.0, "int4_speedup": 3.0}]}}
    met = {t["target"]: t["met"] for t in report.evaluate_targets({"prefill": pf})}
    assert met["TTFT ours/int8 / llama.cpp Q4_K_M, ~1000-token prompt (avx512_bf16+avx512_vnni)"] is True
    assert met["TTFT ours/int4 / llama.cpp Q4_K_M, ~1000-token prompt (avx512_bf16+avx512_vnni)"] is False
    table = report.prefill_table(pf)
    assert "| ours/int8 | 1000 | 1.600 | 625 | 0.40 | int8mm |" in table
    assert "boom" in table and "| qkv | 1152 x 896 | 256 | 4.00 (130) | 1.00 (528) |" in table


def test_ttft_target_without_a_matrix_engine_is_no_worse_than_the_decode_kernels() -> None:
    """On an AVX2-only CPU the issue asks for no worse than before (prompt rows on the decode kernels), not 0.5x
    llama.cpp; the kernel table names the int4 choice too."""
    pf = {"prompt_tokens": 1000, "cpu_isa": ["avx2"], "engines": {
        "llama.cpp/Q4_K_M": {"ttft_s": 30.0},
        "ours/int8": {"ttft_s": 16.0, "kernel_plan": {"prefill_kernel": "int8avx2"}},
        "ours/int8-decode-kernels": {"ttft_s": 20.0},
        "ours/int4": {"ttft_s": 22.0, "kernel_plan": {"prefill_kernel": "none"}},
        "ours/int4-decode-kernels": {"ttft_s": 20.0}},
        "kernels": {"chosen": "int8avx2", "why": "AVX2", "chosen_int4": "none", "why_int4": "as fast", "rows": [
            {"layer": "o", "N": 896, "K": 896, "M": 256, "dq_int8_ms": 8.0, "dq_int8_gflop_s": 51.0,
             "int8avx2_int8_ms": 6.0, "int8avx2_int8_gflop_s": 68.0, "int8_speedup": 1.33}]}}
    targets = {t["target"]: t for t in report.evaluate_targets({"prefill": pf})}
    int8 = targets["TTFT ours/int8 / every prompt row on the decode kernels (the path of before), ~1000-token prompt "
                   "(avx2)"]
    int4 = targets["TTFT ours/int4 / every prompt row on the decode kernels (the path of before), ~1000-token prompt "
                   "(avx2)"]
    assert int8["met"] is True and int8["value"] == 0.8
    assert int4["met"] is False  # 10% slower: beyond the noise allowed
    assert not any(t.startswith("TTFT") and "llama.cpp" in t for t in targets)
    table = report.prefill_table(pf)
    assert "int4 weights: none (as fast)" in table
    assert "| o | 896 x 896 | 256 | 8.00 (51) | - (-) | - (-) | 6.00 (68) | - (-) |" in table
