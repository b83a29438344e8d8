"""bench/gpu.py's pieces that need no GPU: the bound per mode, the copy-bandwidth measurement, and the
whole run (our decode timing, transformers generate, the JSON) on the CPU with the tiny model."""

from __future__ import annotations

import json

import pytest

from bench import gpu
from bench.bandwidth import ModelShape, weight_bytes_per_token
from tests.runtime_fixtures import build_tiny_qwen2_dir

R1 = ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, r1_tokenizer_dir):
    return build_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny-gpu-bench"), r1_tokenizer_dir)


def test_bound_rows_follow_the_plans_storage():
    bw = 4.8e12  # H200
    bf16, i8, i4 = (gpu.bound_row(R1, m, bw) for m in ("bf16", "int8-dequant", "int4"))
    assert bf16["bytes_per_token"] == weight_bytes_per_token(R1, "bf16", lm_head_mode="bf16")
    assert i8["bytes_per_token"] == weight_bytes_per_token(R1, "int8", lm_head_mode="int8")
    assert i4["bytes_per_token"] < i8["bytes_per_token"] < bf16["bytes_per_token"]
    assert i4["bound_tok_s"] == pytest.approx(bw / i4["bytes_per_token"])


def test_copy_bandwidth_is_measured_on_the_given_device():
    assert gpu.measure_copy_bandwidth("cpu", mib=8, repeats=2) > 1e8


def test_the_run_writes_rows_and_errors_to_json_on_the_cpu(tiny_dir, tmp_path):
    out = tmp_path / "gpu.json"
    data = gpu.run(out, {"tiny": tiny_dir}, device="cpu", steps=2, batches=(2,), budget_s=600)
    saved = json.loads(out.read_text())
    assert saved["rows"] == data["rows"] and saved["meta"]["copy_bandwidth_gb_s"] > 0
    ours = {r["mode"]: r for r in data["rows"] if r["engine"] == "ours"}
    assert set(ours) == {"bf16", "int8-int8pack_mm", "int8-dequant", "int4"}, data["errors"]
    assert all(r["tok_s"] > 0 and r["batch"] == 2 and r["fraction_of_bound"] > 0 for r in ours.values())
    assert ours["int4"]["plan"]["quantization"] == "int4"
    hf = [r for r in data["rows"] if r["engine"] == "transformers-generate"]
    assert len(hf) == 1 and hf[0]["tok_s"] > 0


def test_a_run_over_its_budget_records_what_it_skipped(tiny_dir, tmp_path):
    data = gpu.run(tmp_path / "gpu.json", {"tiny": tiny_dir}, device="cpu", steps=1, batches=(1,), budget_s=0)
    assert data["rows"] == [] and all("budget" in e["error"] for e in data["errors"])


def test_the_kernel_table_sums_per_step_and_lists_the_largest_first():
    from types import SimpleNamespace as Avg

    averages = [Avg(key="gemv", device_time_total=800.0, count=8), Avg(key="cpu_op", device_time_total=0.0, count=4),
                Avg(key="tinygemm", cuda_time_total=1200.0, device_time_total=None, count=112)]
    t = gpu.kernel_table(averages, steps=4, top=1)
    assert t["kernel_us_per_step"] == 500.0 and t["kernels_per_step"] == 30.0
    assert t["top_kernels"] == [{"kernel": "tinygemm", "us_per_step": 300.0, "calls_per_step": 28.0}]
