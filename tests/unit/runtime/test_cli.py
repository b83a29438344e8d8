"""The runtime's command line: every contract flag parses, and so do the args the operator renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillery_contract import flags
from model_runtime.__main__ import build_parser, check_model_dir, main, options_from_args
from model_runtime.cli import main as cli_main

BOOL_FLAGS = {flags.FLAG_PREQUANTIZED, flags.FLAG_THINK_PREFIX, flags.FLAG_SEPARATE_REASONING}
SAMPLE_VALUES = {
    flags.FLAG_MODEL_NAME: "r1", flags.FLAG_MODEL_DIR: "/mnt/models", flags.FLAG_HTTP_PORT: "9000",
    flags.FLAG_MODEL_FORMAT: "gguf", flags.FLAG_QUANTIZATION: "int4", flags.FLAG_GROUP_SIZE: "64",
    flags.FLAG_DTYPE: "bfloat16", flags.FLAG_DEVICE: "cpu", flags.FLAG_MAX_MODEL_LEN: "2048",
    flags.FLAG_MAX_BATCH_SIZE: "4", flags.FLAG_MAX_QUEUE: "8", flags.FLAG_DEFAULT_TEMPERATURE: "0.6",
    flags.FLAG_DEFAULT_TOP_P: "0.95", flags.FLAG_DEFAULT_MAX_TOKENS: "256",
    flags.FLAG_DEFAULT_TOP_K: "20", flags.FLAG_DEFAULT_REPETITION_PENALTY: "1.1",
    flags.FLAG_MAX_NUM_BATCHED_TOKENS: "64",
    flags.FLAG_LONG_PREFILL_TOKEN_THRESHOLD: "512",
    flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES: "100", flags.FLAG_RESPONSE_CACHE_TTL_S: "30",
    flags.FLAG_RESPONSE_CACHE_MAX_BYTES: "4096",
}
CONTRACT_FLAGS = {name: value for name, value in vars(flags).items() if name.startswith("FLAG_")}


def test_every_contract_flag_is_accepted():
    assert set(CONTRACT_FLAGS.values()) == set(SAMPLE_VALUES) | BOOL_FLAGS  # a new flag needs a value here
    argv = [f"{flag}={value}" for flag, value in SAMPLE_VALUES.items()] + sorted(BOOL_FLAGS)
    args = build_parser().parse_args(argv)
    opts = options_from_args(args)
    assert (opts.model_name, opts.model_dir, args.http_port) == ("r1", "/mnt/models", 9000)
    assert (opts.quantization, opts.group_size, opts.model_format, opts.dtype, opts.device) == (
        "int4", 64, "gguf", "bfloat16", "cpu")
    assert (opts.max_model_len, opts.max_batch_size, opts.max_queue) == (2048, 4, 8)
    assert opts.max_num_batched_tokens == 64
    cache = opts.response_cache
    assert (cache.enabled, cache.max_entries, cache.ttl_s, cache.max_bytes) == (True, 100, 30.0, 4096)
    assert not options_from_args(build_parser().parse_args([])).response_cache.enabled  # off by default
    assert (opts.default_temperature, opts.default_top_p, opts.default_max_tokens) == (0.6, 0.95, 256)
    assert (opts.default_top_k, opts.default_repetition_penalty) == (20, 1.1)
    assert opts.prequantized is True and opts.think_prefix is True and opts.separate_reasoning is True


def test_bool_flags_default_off_and_take_explicit_values():
    args = build_parser().parse_args([])
    assert (args.think_prefix, args.separate_reasoning, args.prequantized) == (False, False, None)
    args = build_parser().parse_args([f"{flags.FLAG_THINK_PREFIX}=false", flags.FLAG_SEPARATE_REASONING])
    assert (args.think_prefix, args.separate_reasoning) == (False, True)


def test_kserve_flags_are_inherited():
    args = build_parser().parse_args(["--grpc_port", "9001", "--enable_grpc", "false"])
    assert args.grpc_port == 9001 and args.enable_grpc is False


@pytest.mark.parametrize("sample", sorted((Path(__file__).parents[3] / "manifests" / "samples").glob("*.yaml")))
def test_args_rendered_by_the_operator_parse(sample):
    from distillery_operator.api import DistilledModel
    from distillery_operator.render import runtime_args

    spec = DistilledModel.model_validate(yaml.safe_load(sample.read_text())).spec
    args = build_parser().parse_args(["--model_name=x", "--model_dir=/mnt/models", *runtime_args(spec)])
    assert args.quantization == spec.quantization.method.value
    assert args.max_queue == spec.serving.max_queue


@pytest.mark.parametrize(
    "argv",
    [
        ["--quantization=int3"], ["--group_size=100"], ["--max_queue=0"], ["--default_top_p=0"],
        ["--default_temperature=3"], ["--think_prefix=maybe"], ["--dtype=int8"],
    ],
)
def test_bad_flag_values_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_serve_refuses_a_missing_model_dir(tmp_path, capsys):
    assert main([f"--model_dir={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["serve", f"--model_dir={tmp_path / 'missing'}"]) == 2


def test_check_model_dir_matches_the_format(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert check_model_dir(str(tmp_path), "safetensors") is None
    assert "no .gguf" in check_model_dir(str(tmp_path), "gguf")


def test_console_script_usage(capsys):
    assert cli_main([]) == 2
    assert cli_main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2


def test_quantize_is_delegated_to_quantize_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["quantize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--method" in out and "--group-size" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["quantize"])  # SRC and DST are required
    assert exit_info.value.code == 2
