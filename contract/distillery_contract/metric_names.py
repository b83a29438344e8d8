"""Prometheus metric names the runtime exports and the control plane queries (KEDA triggers, alert rules,
dashboards). Every runtime metric carries the label METRIC_LABEL_MODEL."""

from __future__ import annotations

from typing import Final

METRIC_LABEL_MODEL: Final = "model_name"
METRIC_REQUESTS_TOTAL: Final = "distillery_requests_total"  # counter, labels: model_name, endpoint, status
METRIC_REQUEST_ERRORS_TOTAL: Final = "distillery_request_errors_total"  # counter, labels: model_name, type
METRIC_TIME_TO_FIRST_TOKEN: Final = "distillery_time_to_first_token_seconds"  # histogram
METRIC_REQUEST_LATENCY: Final = "distillery_request_duration_seconds"  # histogram
METRIC_GENERATED_TOKENS_TOTAL: Final = "distillery_generated_tokens_total"  # counter
METRIC_PROMPT_TOKENS_TOTAL: Final = "distillery_prompt_tokens_total"  # counter
METRIC_REQUESTS_IN_FLIGHT: Final = "distillery_requests_in_flight"  # gauge
METRIC_QUEUE_DEPTH: Final = "distillery_queue_depth"  # gauge: requests waiting for a batch slot
METRIC_RUNNING_SEQUENCES: Final = "distillery_running_sequences"  # gauge
METRIC_KV_CACHE_USAGE: Final = "distillery_kv_cache_usage_ratio"  # gauge 0..1
METRIC_KV_CACHE_BYTES: Final = "distillery_kv_cache_bytes"  # gauge: KV cache memory holding live tokens
METRIC_GPU_MEMORY_BYTES: Final = "distillery_gpu_memory_bytes"  # gauge: GPU memory the runtime holds (0 on CPU)
METRIC_TOKENS_PER_SECOND: Final = "distillery_tokens_per_second"  # gauge, decode rate over the last window
METRIC_QUEUE_REJECTED_TOTAL: Final = "distillery_queue_rejected_total"  # counter: 429s
# automatic prefix caching (model_runtime/prefix_cache.py), in tokens as vLLM's: hit rate = hits / queries
METRIC_PREFIX_CACHE_QUERIES_TOTAL: Final = "distillery_prefix_cache_queries_total"  # counter: prompt tokens looked up
METRIC_PREFIX_CACHE_HITS_TOTAL: Final = "distillery_prefix_cache_hits_total"  # counter: ... served from cached blocks
METRIC_PREFIX_CACHE_BLOCKS: Final = "distillery_prefix_cache_blocks"  # gauge: KV blocks cached now
METRIC_PREFIX_CACHE_CAPACITY_BLOCKS: Final = "distillery_prefix_cache_capacity_blocks"  # gauge: 0 when off
# response cache (model_runtime/response_cache.py; off unless --response_cache_max_entries > 0)
# counter, label result: hit | miss | bypass (not looked up: sampling, stream, Cache-Control)
METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL: Final = "distillery_response_cache_lookups_total"
METRIC_RESPONSE_CACHE_STORES_TOTAL: Final = "distillery_response_cache_stores_total"  # counter
# counter, label reason: expired | entries | bytes
METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL: Final = "distillery_response_cache_evictions_total"
METRIC_RESPONSE_CACHE_ENTRIES: Final = "distillery_response_cache_entries"  # gauge
METRIC_RESPONSE_CACHE_BYTES: Final = "distillery_response_cache_bytes"  # gauge: stored bodies and keys

# NVIDIA DCGM exporter's utilisation gauge, for the gpuUtilization autoscaling metric.
METRIC_DCGM_GPU_UTIL: Final = "DCGM_FI_DEV_GPU_UTIL"
