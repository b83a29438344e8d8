"""Quantize a Transformer's Linear layers (int8 per-channel / int4 group-wise, weight-only) and
save/load the portable artifact: one model.safetensors of codes + scales (+ zeros) and float
tensors, plus quantization.json (method, group size, source checksum, tool version, config).

Loading an artifact rebuilds the same modules from the stored codes: no re-quantization, so the
weights (and therefore the outputs) are bit-identical to the model that was saved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from distillery_contract.artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactManifest,
)
from distillery_contract.values import QUANTIZED_METHODS
from model_runtime.kernels import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    RowsLike,
    quantize_int4_packed,
    quantize_int8,
)

if TYPE_CHECKING:
    from model_runtime.model import Transformer

MANIFEST = MANIFEST_FILE
METHODS = QUANTIZED_METHODS


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"distillery {version('distillery')}, torch {torch.__version__}"
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        return f"distillery (source), torch {torch.__version__}"


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def is_quantized_linear(m: nn.Module) -> bool:
    return isinstance(m, QUANTIZED_LINEARS)


def quantize_linear(weight: RowsLike, bias: Tensor | None, method: str, group_size: int,
                    act_dtype: torch.dtype, keep_codes: bool = False, *, backend: str = "aten",
                    int8_kernel: str = "", device: torch.device | None = None, prefill_kernel: str = "none",
                    prefill_min_rows: int = 0) -> nn.Module:
    """A weight [N, K] (any float dtype; quantized from its float32 value, a chunk of rows at a time on
    `device`, default the weight's) -> Int8Linear/Int4Linear running on `backend` (the plan's), prompt
    chunks of >= prefill_min_rows rows on prefill_kernel (the plan's, dq only)."""
    if method == "int8":
        codes, scales = quantize_int8(weight, device=device)
        return Int8Linear(codes, scales, bias, act_dtype, backend=backend, int8_kernel=int8_kernel,
                          prefill_kernel=prefill_kernel, prefill_min_rows=prefill_min_rows)
    if method == "int4":
        qweight, scales, zeros = quantize_int4_packed(weight, group_size, device=device)
        return Int4Linear(qweight, scales, zeros, bias, act_dtype, keep_codes, backend=backend,
                          prefill_kernel=prefill_kernel, prefill_min_rows=prefill_min_rows)
    raise ValueError(f"unknown quantization method {method!r} (int8, int4)")


def file_checksum(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def artifact_state(model: nn.Module) -> dict[str, Tensor]:
    """Everything needed to rebuild the model: float params, and codes/scales/zeros/bias of quantized layers."""
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Int4Embedding):
            state[prefix + "qweight"] = module.qweight
            state[prefix + "scales"] = module.scales
            state[prefix + "zeros"] = module.zeros
            continue
        if isinstance(module, Int8Embedding):
            head = getattr(model, "lm_head", None)
            if not (isinstance(head, Int8Linear) and head.codes is module.codes):  # shared with a tied head: once
                state[prefix + "codes"] = module.codes
                state[prefix + "scales"] = module.scales
            continue
        if isinstance(module, Int8Linear):
            state[prefix + "codes"] = module.codes
            state[prefix + "scales"] = module.scales
        elif isinstance(module, Int4Linear):
            if module.qweight is None:
                raise ValueError(f"{name}: int4 codes were dropped after packing; quantize with keep_codes=True")
            state[prefix + "qweight"] = module.qweight
            state[prefix + "scales"] = module.scales
            state[prefix + "zeros"] = module.zeros
        if is_quantized_linear(module):
            if module.bias is not None:
                state[prefix + "bias"] = module.bias
            continue
        float_dtype = getattr(model, "float_dtype", None)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied lm_head: stored once, as embed.weight
                continue
            seen.add(id(p))
            # norms run in float32 on the CPU integer kernels; store them in the model's float dtype
            # (the same values) so the artifact does not depend on the machine that wrote it
            data = p.data
            state[prefix + pname] = data.to(float_dtype) if float_dtype and data.is_floating_point() else data
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_quantized(model: Transformer, dst: Path, *, method: str, group_size: int, quantize_lm_head: Any,
                   source: str, source_checksum: str, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write dst/model.safetensors, dst/quantization.json, dst/config.json (+ tokenizer files given)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = artifact_state(model)
    save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": ARTIFACT_FORMAT})
    (dst / WEIGHTS_FILE).chmod(0o644)  # readable by the serving container's (other) user
    cfg = model.config
    (dst / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    manifest: ArtifactManifest = {
        "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION, "method": method,
        "group_size": group_size if method == "int4" else None, "quantize_lm_head": quantize_lm_head,
        "lm_head": {Int8Linear: "int8", Int4Linear: "int4"}.get(type(model.lm_head), "float"),
        "source": source, "source_checksum": source_checksum, "tool_version": tool_version(),
        "weights_checksum": file_checksum([dst / WEIGHTS_FILE]), "config": cfg.as_dict(),
        "float_dtype": str(model.float_dtype).removeprefix("torch."),
    }
    for name, data in (extra_files or {}).items():
        (dst / name).write_bytes(data)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dst


def read_manifest(path: Path) -> dict[str, Any] | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    manifest: dict[str, Any] = json.loads(f.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{f}: not a {ARTIFACT_FORMAT} manifest")
    if int(manifest.get("format_version", 0)) > ARTIFACT_FORMAT_VERSION:
        raise ValueError(f"{f}: format version {manifest['format_version']} is newer than this runtime "
                         f"supports ({ARTIFACT_FORMAT_VERSION}); upgrade the runtime")
    return manifest


def linear_from_state(name: str, keys: set[str], get: Callable[[str], Tensor], act_dtype: torch.dtype,
                      device: torch.device, *, backend: str = "aten", int8_kernel: str = "",
                      keep_codes: bool = False, prefill_kernel: str = "none",
                      prefill_min_rows: int = 0) -> nn.Module | None:
    """Rebuild a quantized Linear stored under `name` (None when it was stored as a float weight)."""
    bias = get(f"{name}.bias").to(device) if f"{name}.bias" in keys else None
    if f"{name}.codes" in keys:
        return Int8Linear(get(f"{name}.codes").to(device), get(f"{name}.scales").to(device), bias, act_dtype,
                          backend=backend, int8_kernel=int8_kernel, prefill_kernel=prefill_kernel,
                          prefill_min_rows=prefill_min_rows)
    if f"{name}.qweight" in keys:
        return Int4Linear(get(f"{name}.qweight").to(device), get(f"{name}.scales").to(device),
                          get(f"{name}.zeros").to(device), bias, act_dtype, keep_codes, backend=backend,
                          prefill_kernel=prefill_kernel, prefill_min_rows=prefill_min_rows)
    return None
