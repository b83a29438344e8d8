"""`python -m model_runtime --model_name NAME --model_dir DIR [...]`: the serving command.

The ClusterServingRuntime runs this. The parser extends KServe's model_server.parser (so
--http_port, --grpc_port, --workers ... keep KServe's meaning) with the flags named in
distillery_contract.flags, which the operator's renderer writes into the InferenceService.
The weights load first (KServe's pattern), then the HTTP server starts with the model ready
(GET /v1/models/NAME -> 200). A load failure ends the process with exit status 1 and a log line
that says why.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from kserve import model_server
from kserve.utils.utils import strtobool

from distillery_contract import flags, values
from model_runtime.log_config import configure_logging
from model_runtime.request_decoding import DEFAULT_MAX_BODY_BYTES
from model_runtime.response_cache import DEFAULT_MAX_BYTES, DEFAULT_TTL_S, ResponseCacheConfig
from model_runtime.server import DistilleryModel, RuntimeModelServer, RuntimeOptions, add_routes

log = logging.getLogger("model_runtime")


def _bool(value: str) -> bool:
    return bool(strtobool(value))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _nonnegative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _unit_float(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def _top_k(value: str) -> int:
    number = int(value)
    if number != -1 and number < 1:
        raise argparse.ArgumentTypeError(f"must be -1 (off) or at least 1, got {value}")
    return number


def _temperature(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 2], got {value}")
    return number


def _add_bool_flag(parser: argparse.ArgumentParser, name: str, *, default: bool | None,
                   help: str | None = None) -> None:
    """A boolean flag given as `--x` (true) or `--x=false`."""
    parser.add_argument(name, default=default, nargs="?", const=True, type=_bool, help=help)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The contract's flags (and a few local ones) on top of KServe's parser."""
    existing = {opt for action in parser._actions for opt in action.option_strings}
    # KServe's parser already defines --model_name and --http_port; their meaning is the contract's.
    assert flags.FLAG_MODEL_NAME in existing and flags.FLAG_HTTP_PORT in existing
    parser.add_argument(flags.FLAG_MODEL_DIR, default=flags.MODEL_MOUNT_DIR,
                        help="model directory (HF safetensors + tokenizer, our quantized artifact) or a .gguf file")
    parser.add_argument(flags.FLAG_MODEL_FORMAT, default="auto", choices=["auto", *values.WEIGHT_FORMATS],
                        help="format of --model_dir; auto detects it")
    parser.add_argument(flags.FLAG_QUANTIZATION, default=values.QuantMethod.NONE.value, choices=values.QUANT_METHODS,
                        help="weight-only quantization applied at load")
    parser.add_argument(flags.FLAG_GROUP_SIZE, default=values.DEFAULT_GROUP_SIZE, type=int, choices=values.INT4_GROUP_SIZES,
                        help="int4 group size")
    _add_bool_flag(parser, flags.FLAG_PREQUANTIZED, default=None,
                   help="the weights are already our quantized artifact; unset: detect its manifest")
    parser.add_argument(flags.FLAG_DTYPE, default="auto", choices=values.DTYPES)
    parser.add_argument(flags.FLAG_DEVICE, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(flags.FLAG_MAX_MODEL_LEN, default=None, type=_positive_int,
                        help="context length; unset: the model's")
    parser.add_argument(flags.FLAG_MAX_BATCH_SIZE, default=values.DEFAULT_MAX_BATCH_SIZE, type=_positive_int,
                        help="sequences decoded together")
    parser.add_argument(flags.FLAG_MAX_QUEUE, default=values.DEFAULT_MAX_QUEUE, type=_positive_int,
                        help="waiting requests beyond this get HTTP 429")
    parser.add_argument(flags.FLAG_MAX_NUM_BATCHED_TOKENS, default=None, type=_positive_int,
                        help="token budget of an engine step while sequences decode (vLLM's): one per decoding "
                             "sequence, the rest on prompt chunks; smaller keeps their inter-token latency flat while "
                             "prompts prefill beside them, larger gets those prompts their first token sooner; unset: "
                             "the engine's default")
    parser.add_argument(flags.FLAG_LONG_PREFILL_TOKEN_THRESHOLD, default=None, type=_nonnegative_int,
                        help="while sequences decode, a prompt longer than this takes only a few tokens per step "
                             "(keeps their inter-token latency near that of decoding alone; shorter prompts take the "
                             "whole budget); 0: no cap; unset: the engine's default (512)")
    parser.add_argument(flags.FLAG_DEFAULT_TEMPERATURE, default=None, type=_temperature,
                        help="default temperature; unset: the model's generation_config")
    parser.add_argument(flags.FLAG_DEFAULT_TOP_P, default=None, type=_unit_float,
                        help="default top_p; unset: the model's generation_config")
    parser.add_argument(flags.FLAG_DEFAULT_TOP_K, default=None, type=_top_k,
                        help="default top_k (-1: off); unset: the model's generation_config, else off")
    parser.add_argument(flags.FLAG_DEFAULT_REPETITION_PENALTY, default=None, type=_positive_float,
                        help="default repetition_penalty; unset: the model's generation_config, else 1.0")
    parser.add_argument(flags.FLAG_DEFAULT_MAX_TOKENS, default=None, type=_positive_int,
                        help="default max_tokens; unset: up to the end of the context")
    _add_bool_flag(parser, flags.FLAG_THINK_PREFIX, default=False,
                   help='force "<think>\\n" after the generation prompt (DeepSeek-R1)')
    _add_bool_flag(parser, flags.FLAG_SEPARATE_REASONING, default=False,
                   help="return the thinking as reasoning_content (DeepSeek API style)")
    parser.add_argument(flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES, default=0, type=_nonnegative_int,
                        help="cache up to this many answers to deterministic OpenAI requests (temperature 0 or a "
                             "seed; not streams); 0: the response cache is off")
    parser.add_argument(flags.FLAG_RESPONSE_CACHE_TTL_S, default=DEFAULT_TTL_S, type=_positive_float,
                        help="seconds a cached response is served")
    parser.add_argument(flags.FLAG_RESPONSE_CACHE_MAX_BYTES, default=DEFAULT_MAX_BYTES, type=_positive_int,
                        help="bytes of cached responses at most (least recently used go first)")
    parser.add_argument("--http_host", default="0.0.0.0", help="address to listen on (127.0.0.1 for local use)")
    parser.add_argument("--request_timeout_s", default=600.0, type=float, help="per-request engine timeout")
    parser.add_argument("--log_level", default=os.environ.get("LOG_LEVEL", "INFO"))
    _add_bool_flag(parser, "--log_prompts", default=False, help="log prompt text (debugging only)")
    _add_bool_flag(parser, "--allow_pickle", default=False, help="allow .bin/.pt (pickle) weights")
    _add_bool_flag(parser, "--trust_remote_code", default=False)
    # hostile clients: limits and timeouts on every route
    parser.add_argument("--max_body_bytes", default=DEFAULT_MAX_BODY_BYTES, type=_positive_int,
                        help="request body limit on every route (larger: HTTP 413)")
    parser.add_argument("--max_prompt_bytes", default=None, type=_positive_int,
                        help="prompt text tokenized per request at most; unset: 32 bytes per token of context, "
                             "at least 64 KiB")
    parser.add_argument("--header_timeout_s", default=10.0, type=_positive_float,
                        help="a client must send its request headers within this (slowloris)")
    parser.add_argument("--body_timeout_s", default=60.0, type=_positive_float,
                        help="a client must send its request body within this after the headers")
    parser.add_argument("--request_workers", default=2, type=_positive_int,
                        help="threads for chat templating, tokenization and large-body decoding")
    _add_bool_flag(parser, "--enable_model_repository_routes", default=False,
                   help="enable KServe's unauthenticated /v2/repository/models/NAME/load|unload routes")
    parser.add_argument("--kernel_backend", default=os.environ.get("DISTILLERY_CPU_KERNELS") or "auto",
                        choices=["auto", "dq", "aten", "generic"],
                        help="quantized linears' kernels: auto (CPU: our integer kernels when they build, else "
                             "PyTorch's packed ones; CUDA: int8pack/tinygemm), dq, aten, or generic (the "
                             "device-generic PyTorch path the GPU runs minus its CUDA-only kernels); default "
                             "from DISTILLERY_CPU_KERNELS")
    _add_bool_flag(parser, "--compile", default=None,
                   help="torch.compile the decode step (CUDA: reduce-overhead, CUDA graphs); unset: on for "
                        "CUDA, off on CPU (DISTILLERY_COMPILE=1 turns it on); --compile=false turns it off")
    parser.add_argument("--gpu_memory_utilization", default=0.9, type=_unit_float,
                        help="CUDA: fraction of the GPU's memory the runtime may use; the KV cache gets what the "
                             "weights leave (a model that does not fit fails at start-up)")
    _add_bool_flag(parser, "--enable_prefix_caching", default=True,
                   help="automatic prefix caching: keep the KV of prompt prefixes and reuse it for later prompts "
                        "that start the same way (vLLM's); --enable_prefix_caching=false turns it off")
    parser.add_argument("--prefix_cache_bytes", default=None, type=_positive_int,
                        help="memory for cached prefix KV blocks; unset: 512 MiB (CUDA: at most what the KV "
                             "cache's share of --gpu_memory_utilization leaves over)")
    _add_bool_flag(parser, "--allow_special_tokens_in_content", default=False,
                   help="trusted clients only: control tokens typed in message text are read as control tokens")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m model_runtime",
        description="Serve a distilled, quantized LLM: KServe V1/V2 and an OpenAI-compatible API.",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_runtime_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(
        model_name=args.model_name, model_dir=args.model_dir, model_format=args.model_format,
        quantization=args.quantization, group_size=args.group_size, prequantized=args.prequantized,
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, request_timeout_s=args.request_timeout_s,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        default_temperature=args.default_temperature, default_top_p=args.default_top_p,
        default_top_k=args.default_top_k, default_repetition_penalty=args.default_repetition_penalty,
        default_max_tokens=args.default_max_tokens, think_prefix=args.think_prefix,
        separate_reasoning=args.separate_reasoning, log_prompts=args.log_prompts,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        max_body_bytes=args.max_body_bytes, max_prompt_bytes=args.max_prompt_bytes,
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        enable_model_repository_routes=args.enable_model_repository_routes,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content, request_workers=args.request_workers,
        kernel_backend=args.kernel_backend, compile=args.compile,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, prefix_cache_bytes=args.prefix_cache_bytes,
        response_cache=ResponseCacheConfig(max_entries=args.response_cache_max_entries,
                                           max_bytes=args.response_cache_max_bytes, ttl_s=args.response_cache_ttl_s),
    )


def check_model_dir(path: str, model_format: str) -> str | None:
    """A clear message when --model_dir cannot hold a model of --model_format, else None."""
    p = Path(path)
    if not p.exists():
        return f"--model_dir {path} does not exist"
    files = [p] if p.is_file() else list(p.iterdir())
    has_gguf = any(f.suffix == ".gguf" for f in files)
    has_st = any(f.suffix == ".safetensors" for f in files)
    if model_format == "gguf" and not has_gguf:
        return f"--model_format gguf but no .gguf file in {path}"
    if model_format == "safetensors" and not has_st:
        return f"--model_format safetensors but no .safetensors file in {path}"
    return None


def _is_user_error(exc: Exception) -> bool:
    return type(exc).__name__ == "ModelLoadError"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    # KServe's own routes use ORJSONResponse, which FastAPI now flags on every call: keep the JSON
    # log stream free of that non-JSON warning text.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    configure_logging(args.log_level.upper(), log_prompts=args.log_prompts)
    problem = check_model_dir(args.model_dir, args.model_format)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model = DistilleryModel(options_from_args(args))
    server = RuntimeModelServer(
        http_host=args.http_host, http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        max_asyncio_workers=args.max_asyncio_workers, timeout_keep_alive=args.timeout_keep_alive,
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
    )
    # Before ModelServer.start(): KServe adds its routes after ours, so ours win where paths overlap.
    add_routes(model_server.app, model)
    # Load in the main thread, before the server starts (KServe's pattern: the pod is not ready
    # until then). Loading in a helper thread leaves that thread's OpenMP pool spinning, which
    # made decoding on 2 cores ~10x slower (measured: 50 tokens 7.5 s vs 0.6 s on the tiny model).
    try:
        model.load()
    except Exception as exc:
        log.error("model load failed: %s", exc, exc_info=not _is_user_error(exc))
        return 1
    try:
        server.start([model])
    finally:
        model.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
