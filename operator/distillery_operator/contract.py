"""The contract between the control plane and the model runtime, defined once.

The renderer writes these flags into the InferenceService's container args and these metric names
into KEDA's Prometheus queries; the runtime's CLI parses the same flags and exports the same
metrics. Tests on both sides import this module so the two halves cannot drift apart.
This module imports nothing heavy: the runtime image and the operator image both carry it.
"""

from __future__ import annotations

from typing import Final

# --- Runtime CLI flags (python -m model_runtime ...). KServe's own flags use snake_case too. ---
# Value flags are rendered as "--flag=value". Bool flags (marked "bool flag") are argparse store_true,
# off by default: the renderer passes the bare flag to turn one on and omits it to leave it off.
FLAG_MODEL_NAME: Final = "--model_name"
FLAG_MODEL_DIR: Final = "--model_dir"
FLAG_HTTP_PORT: Final = "--http_port"
FLAG_MODEL_FORMAT: Final = "--model_format"  # safetensors | gguf
FLAG_QUANTIZATION: Final = "--quantization"  # none | int8 | int4
FLAG_GROUP_SIZE: Final = "--group_size"  # int4 group size: 32 | 64 | 128
FLAG_PREQUANTIZED: Final = "--prequantized"  # bool flag: weights already in our quantized format
FLAG_DTYPE: Final = "--dtype"  # auto | bfloat16 | float16 | float32
FLAG_DEVICE: Final = "--device"  # auto | cpu | cuda
FLAG_MAX_MODEL_LEN: Final = "--max_model_len"
FLAG_MAX_BATCH_SIZE: Final = "--max_batch_size"
FLAG_MAX_QUEUE: Final = "--max_queue"
FLAG_DEFAULT_TEMPERATURE: Final = "--default_temperature"
FLAG_DEFAULT_TOP_P: Final = "--default_top_p"
FLAG_DEFAULT_MAX_TOKENS: Final = "--default_max_tokens"
FLAG_THINK_PREFIX: Final = "--think_prefix"  # bool flag: force "<think>\n" at the start of answers
FLAG_SEPARATE_REASONING: Final = "--separate_reasoning"  # bool flag: return reasoning_content

RUNTIME_MODULE: Final = "model_runtime"  # python -m model_runtime
RUNTIME_HTTP_PORT: Final = 8080
MODEL_MOUNT_DIR: Final = "/mnt/models"  # where KServe's storage initializer puts the model

# --- Runtime HTTP paths used by probes ---
HEALTH_LIVE_PATH: Final = "/"  # KServe ModelServer answers {"status": "alive"} here
HEALTH_READY_PATH_TEMPLATE: Final = "/v1/models/{model_name}"  # 200 only once weights are loaded
METRICS_PATH: Final = "/metrics"

# --- Prometheus metric names exported by the runtime (label: model_name) ---
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
METRIC_TOKENS_PER_SECOND: Final = "distillery_tokens_per_second"  # gauge, decode rate over the last window
METRIC_QUEUE_REJECTED_TOTAL: Final = "distillery_queue_rejected_total"  # counter: 429s

# NVIDIA DCGM exporter's utilisation gauge, for the gpuUtilization autoscaling metric.
METRIC_DCGM_GPU_UTIL: Final = "DCGM_FI_DEV_GPU_UTIL"
