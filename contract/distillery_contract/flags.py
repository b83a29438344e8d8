"""The model runtime's command line, port, mount path and probe paths.

The renderer writes these flags into the InferenceService's container args; the runtime's parser
(model_runtime/__main__.py) defines the same flags, with choices and defaults from `values`.
`tests/unit/test_contract.py` parses every rendered argument list with the runtime's real parser.
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
FLAG_MAX_NUM_BATCHED_TOKENS: Final = "--max_num_batched_tokens"  # tokens per engine step (decode rows + prompt)
FLAG_LONG_PREFILL_TOKEN_THRESHOLD: Final = "--long_prefill_token_threshold"  # longer prompts: small chunks beside decode
FLAG_DEFAULT_TEMPERATURE: Final = "--default_temperature"
FLAG_DEFAULT_TOP_P: Final = "--default_top_p"
FLAG_DEFAULT_TOP_K: Final = "--default_top_k"  # -1: off
FLAG_DEFAULT_REPETITION_PENALTY: Final = "--default_repetition_penalty"
FLAG_DEFAULT_MAX_TOKENS: Final = "--default_max_tokens"
FLAG_THINK_PREFIX: Final = "--think_prefix"  # bool flag: force "<think>\n" at the start of answers
FLAG_SEPARATE_REASONING: Final = "--separate_reasoning"  # bool flag: return reasoning_content
# exact-match response cache for deterministic OpenAI requests (model_runtime/response_cache.py)
FLAG_RESPONSE_CACHE_MAX_ENTRIES: Final = "--response_cache_max_entries"  # 0 (default): the cache is off
FLAG_RESPONSE_CACHE_TTL_S: Final = "--response_cache_ttl_s"  # seconds a cached response is served
FLAG_RESPONSE_CACHE_MAX_BYTES: Final = "--response_cache_max_bytes"  # bytes of cached responses at most

RUNTIME_MODULE: Final = "model_runtime"  # python -m model_runtime
RUNTIME_HTTP_PORT: Final = 8080
MODEL_MOUNT_DIR: Final = "/mnt/models"  # where KServe's storage initializer puts the model

# --- Runtime HTTP paths used by probes ---
HEALTH_LIVE_PATH: Final = "/"  # KServe ModelServer answers {"status": "alive"} here
HEALTH_READY_PATH_TEMPLATE: Final = "/v1/models/{model_name}"  # 200 only once weights are loaded
METRICS_PATH: Final = "/metrics"
