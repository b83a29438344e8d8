"""KV cache sizing from GPU memory (--gpu_memory_utilization), the CUDA-graph KV buckets, and the
GPU memory / KV bytes gauges: the arithmetic runs on the CPU; the real device in test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from model_runtime.config import ModelConfig
from model_runtime.engine import EngineStats, kv_bucket
from model_runtime.gpu_memory import GiB, GpuMemoryError, kv_slot_bytes, size_kv_cache
from model_runtime.metrics import EngineMetrics

# DeepSeek-R1-Distill-Qwen-1.5B: 28 layers, 2 KV heads of 128
CFG = ModelConfig(arch="qwen2", hidden_size=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960,
                  vocab_size=151936, max_position=131072)


def test_slot_bytes():
    # 2 (k, v) x 28 layers x 2 heads x 128 x 4096 positions x 2 bytes = 112 MiB
    assert kv_slot_bytes(CFG, 4096, torch.float16) == 2 * 28 * 2 * 128 * 4096 * 2 == 112 << 20


def test_the_cache_takes_what_the_weights_leave_and_the_batch_shrinks_to_fit():
    total = int(16 * GiB)   # a T4
    b = size_kv_cache(CFG, max_len=4096, max_batch=8, dtype=torch.float16, total_bytes=total,
                      free_bytes=total - int(2 * GiB), utilization=0.9)
    assert b.slots == 8 and b.used_bytes == int(2 * GiB)
    b = size_kv_cache(CFG, max_len=32768, max_batch=64, dtype=torch.float16, total_bytes=total,
                      free_bytes=total - int(2 * GiB), utilization=0.9)
    assert b.slots == (int(total * 0.86) - int(2 * GiB)) // kv_slot_bytes(CFG, 32768, torch.float16) < 64


def test_a_model_that_does_not_fit_fails_with_the_numbers():
    total = int(16 * GiB)
    with pytest.raises(GpuMemoryError) as err:
        size_kv_cache(CFG, max_len=131072, max_batch=8, dtype=torch.float16, total_bytes=total,
                      free_bytes=total - int(13.5 * GiB), utilization=0.9)
    msg = str(err.value)
    assert "16.00 GiB GPU" in msg and "13.50 GiB in use" in msg and "131072 tokens needs 3.50 GiB" in msg
    assert "--gpu_memory_utilization 0.9" in msg and "--max_model_len" in msg
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        size_kv_cache(CFG, max_len=16, max_batch=1, dtype=torch.float16, total_bytes=total, free_bytes=total,
                      utilization=1.5)


def test_kv_buckets_are_powers_of_two_capped_at_max_len():
    assert [kv_bucket(n, 4096) for n in (1, 64, 65, 300, 4000)] == [64, 64, 128, 512, 4096]
    assert kv_bucket(5000, 4500) == 4500


def test_gpu_memory_and_kv_bytes_are_gauges():
    registry = CollectorRegistry()
    m = EngineMetrics("r1", registry)
    m.observe_step(EngineStats(kv_cache_bytes=4096, gpu_memory_bytes=123456))
    assert registry.get_sample_value("distillery_kv_cache_bytes", {"model_name": "r1"}) == 4096
    assert registry.get_sample_value("distillery_gpu_memory_bytes", {"model_name": "r1"}) == 123456


def test_the_engine_reports_kv_bytes_of_live_tokens(tiny_qwen2_dir):
    from model_runtime.engine import Engine, EngineConfig
    from model_runtime.loader import load_model

    loaded = load_model(tiny_qwen2_dir, max_model_len=64)
    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_model_len=64))
    assert engine._token_bytes == kv_slot_bytes(loaded.config, 1, torch.float32)
    engine._update_stats()
    assert engine._stats.kv_cache_bytes == 0 and engine._stats.gpu_memory_bytes == 0
