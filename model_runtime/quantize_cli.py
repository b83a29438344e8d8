"""`model-runtime quantize SRC DST --method int4 --group-size 128`: write a quantized artifact.

SRC: a HF model directory or a GGUF file. DST gets model.safetensors (int8/int4 codes, scales,
zeros, float norms/embeddings), config.json, quantization.json (method, group size, source
checksum, tool version, config), the tokenizer files, chat template and generation_config.json.
`python -m model_runtime --model_dir DST` then serves it with no re-quantization.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from distillery_contract.values import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES, QUANTIZED_METHODS


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", help="source model: a HF directory (safetensors) or a .gguf file")
    p.add_argument("dst", help="output directory for the quantized artifact")
    p.add_argument("--method", choices=QUANTIZED_METHODS, default="int8",
                   help="int8: per-output-channel; int4: group-wise (see --group-size)")
    p.add_argument("--group-size", "--group_size", dest="group_size", type=int, choices=INT4_GROUP_SIZES,
                   default=DEFAULT_GROUP_SIZE, help="int4 group size")
    p.add_argument("--lm-head", "--lm_head", dest="lm_head", choices=["auto", "float", "same"], default="auto",
                   help="output projection: auto = int8 (per-channel) for both methods, float = keep it in "
                        "--dtype, same = the --method (int4 head: smallest, least accurate)")
    p.add_argument("--quantize-lm-head", "--quantize_lm_head", dest="lm_head", action="store_const", const="same",
                   help="same as --lm-head same")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tensors kept in float (embeddings, norms, biases)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="allow .bin/.pt (pickle) source weights")
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def build_parser(prog: str = "model-runtime quantize") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))


def _source_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(src.glob("*.safetensors")) or sorted(src.glob("*.gguf")) or sorted(
        f for f in src.iterdir() if f.suffix in (".bin", ".pt", ".pth"))


def run(args: argparse.Namespace) -> int:
    from model_runtime import quant
    from model_runtime.loader import ModelLoadError, load_model, resolve_model_path

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        print(f"error: {dst} is not empty (pass --force to overwrite)", file=sys.stderr)
        return 2
    progress = None
    if args.progress:
        from tqdm import tqdm

        def progress(names: list[str]) -> Any:
            return tqdm(names, desc=f"quantizing ({args.method})", unit="module", file=sys.stderr)

    started = time.monotonic()
    try:
        src = resolve_model_path(args.src)
        loaded = load_model(src, quantization=args.method, group_size=args.group_size, prequantized=False,
                            dtype=args.dtype, device="cpu", allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code,
                            quantize_lm_head={"auto": None, "float": False, "same": True}[args.lm_head],
                            keep_codes=True, progress=progress)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checksum = quant.file_checksum(_source_files(src))
    if dst.exists() and args.force:
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    loaded.tokenizer.save_pretrained(str(dst))
    if getattr(loaded.tokenizer, "chat_template", None) and not (dst / "chat_template.jinja").exists():
        (dst / "chat_template.jinja").write_text(loaded.tokenizer.chat_template)
    gen_src = (src if src.is_dir() else src.parent) / "generation_config.json"
    if src.is_dir() and gen_src.is_file():
        gen = json.loads(gen_src.read_text())
    else:
        gen = dict(loaded.generation_defaults)
    eos = gen.get("eos_token_id")
    eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
    gen["eos_token_id"] = sorted(set(eos_list) | set(loaded.eos_token_ids))
    quant.save_quantized(
        loaded.model, dst, method=args.method, group_size=args.group_size,
        quantize_lm_head=args.lm_head, source=str(src), source_checksum=checksum,
        extra_files={"generation_config.json": json.dumps(gen, indent=2).encode()},
    )
    size = sum(f.stat().st_size for f in dst.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {dst} ({args.method}{f' g{args.group_size}' if args.method == 'int4' else ''}, "
          f"{size / 2**20:.1f} MiB) in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
