"""The output artifact: what the runtime serves, and where it came from.

Layout of the output directory:
  model.safetensors (or shards), config.json, tokenizer files, chat_template.jinja, generation_config.json
  lineage.json    teacher/student/dataset, loss and training settings, steps, final losses and KL, code
                  version, sha256 of every weight file (so a served model can be traced and verified)
  quantized/      with spec.quantization: the runtime's pre-quantized artifact (model_runtime's quantizer,
                  served with --prequantized), with the same lineage.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from distillery_contract.distillation import LINEAGE_FILE, QUANTIZED_SUBDIR, OutputQuantization

GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def weight_hashes(root: Path, subdir: str = "") -> dict[str, str]:
    """{path relative to the output root: sha256} of the weight files in root/subdir."""
    d = root / subdir if subdir else root
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in sorted(d.glob("*.safetensors"))}


def code_version() -> str:
    """distillery-trainer and engine versions, plus the git commit when run from a checkout."""
    from distillery_trainer import __version__

    parts = [f"distillery-trainer {__version__}"]
    for dist in ("torch", "transformers", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        parts.append(f"git {commit}")
    except (OSError, subprocess.SubprocessError):
        pass  # an image: no checkout
    return ", ".join(parts)


def source_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the student checkpoint was stored in (the artifact keeps it); float32 when unsaid."""
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_model(model: nn.Module, tokenizer: Any, out: Path, *, dtype: torch.dtype, student_dir: Path) -> None:
    """Weights (safetensors) + config + tokenizer + chat template + generation config."""
    out.mkdir(parents=True, exist_ok=True)
    cast(Any, model.to(dtype)).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if getattr(tokenizer, "chat_template", None) and not (out / CHAT_TEMPLATE).exists():
        (out / CHAT_TEMPLATE).write_text(tokenizer.chat_template)
    # the student's own sampling defaults and stop tokens, as its publisher wrote them
    if (student_dir / GENERATION_CONFIG).is_file():
        shutil.copy(student_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)


def save_quantized(out: Path, quantization: OutputQuantization) -> Path:
    """out/quantized: the runtime's own quantizer over the float artifact just written."""
    from model_runtime.quantize_cli import main as quantize

    dst: Path = out / QUANTIZED_SUBDIR
    args = [str(out), str(dst), "--method", quantization.method, "--group-size", str(quantization.group_size),
            "--no-progress"]
    if dst.exists():
        args.append("--force")
    if quantize(args) != 0:
        raise RuntimeError(f"quantizing {out} into {dst} failed (see the error above)")
    return dst


def write_lineage(out: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """lineage.json in the artifact (and in its quantized copy), with the sha256 of every weight file.
    Written last: its presence means the artifact is complete."""
    lineage = dict(lineage)
    lineage["createdAt"] = datetime.now(UTC).isoformat(timespec="seconds")
    lineage["weights"] = weight_hashes(out)
    if (out / QUANTIZED_SUBDIR).is_dir():
        lineage["quantized"] = {**lineage.get("quantized", {}), "path": QUANTIZED_SUBDIR,
                                "weights": weight_hashes(out, QUANTIZED_SUBDIR)}
        (out / QUANTIZED_SUBDIR / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage
