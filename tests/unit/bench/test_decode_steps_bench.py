"""bench/kernels.py's decode-step section on the tiny model: a runtime-default row beside each instruction set's,
every row with its step time and the read bandwidth of its own moment (what the bound and issue 15's target use)."""

from __future__ import annotations

import statistics

import pytest
import torch

from bench import report
from bench.kernels import decode_steps
from tests.cpu_kernels import needs_cpu_kernels
from tests.runtime_fixtures import build_tiny_qwen2_dir


@needs_cpu_kernels
def test_decode_step_rows_carry_their_own_bandwidth(tmp_path, r1_tokenizer_dir):
    model_dir = build_tiny_qwen2_dir(tmp_path / "tiny", r1_tokenizer_dir)
    out = decode_steps(str(model_dir), ["int4"], threads=torch.get_num_threads(), batches=(1, 2), steps=2,
                       bandwidth_mib=8)
    rows = out["rows"]
    backends = [r["backend"] for r in rows]
    assert backends[:2] == ["dq", "dq"] and backends[-1] == "aten" and "dq-avx2" in backends
    assert all(r["step_ms"] > 0 and r["read_gb_s"] > 0 and r["bytes_per_token"] > 0 for r in rows)
    assert all(len(r["step_ms_rounds"]) == 3 and len(r["read_gb_s_rounds"]) == 6 and r["paired_fraction"] > 0
               for r in rows)
    assert all(r["step_ms"] == min(r["step_ms_rounds"]) and r["read_gb_s"] == max(r["read_gb_s_rounds"]) for r in rows)
    # and beside it the same read on 2 MiB pages (a stricter bound) where that stream got them
    for r in rows:
        assert 0 <= r["huge_page_kib"] <= 8 << 10
        if r["huge_page_kib"] >= 0.9 * (8 << 10):
            assert r["read_gb_s_huge"] > 0 and r["paired_fraction_huge"] > 0
        else:
            assert "read_gb_s_huge" not in r and "paired_fraction_huge" not in r
    for r in rows:  # the fraction is bytes a step reads / its time / that round's bandwidth, whatever the batch
        fractions = [r["bytes_per_token"] / (ms / 1e3) / (max(r["read_gb_s_rounds"][2 * i:2 * i + 2]) * 1e9)
                     for i, ms in enumerate(r["step_ms_rounds"])]
        assert r["paired_fraction"] == pytest.approx(statistics.median(fractions), rel=0.05, abs=2e-3)
    targets = [t for t in report.evaluate_targets({"decode_steps": out}) if t["target"].startswith("decode step")]
    assert len(targets) == 1 and targets[0]["value"] is not None
