"""Our quantized artifact (quantization.json + model.safetensors, written by quant.save_quantized):
the manifest read and checked, and what it stores (method, group size, how lm_head and the
embedding are kept) so the plan can be made before any module is built. Codes load as stored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model_runtime import quant
from model_runtime.config import ModelConfig
from model_runtime.load_error import ModelLoadError
from model_runtime.safetensors_reader import hf_source
from model_runtime.tensor_source import TensorSource


@dataclass(frozen=True)
class Artifact:
    config: ModelConfig
    method: str                 # int8 | int4
    group_size: int | None
    source: TensorSource


def read_artifact(path: Path, quantization: str) -> Artifact:
    """The artifact at `path`; `quantization` is what the request asked ("none": whatever is stored)."""
    try:
        manifest = quant.read_manifest(path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if manifest is None:
        raise ModelLoadError(f"{path} has no {quant.MANIFEST}")
    if quantization not in ("none", manifest["method"]):
        raise ModelLoadError(f"{path} holds {manifest['method']} weights; --quantization {quantization} "
                             f"would need the float checkpoint (omit it, or pass {manifest['method']})")
    return Artifact(config=ModelConfig(**manifest["config"]), method=manifest["method"],
                    group_size=manifest.get("group_size"), source=hf_source(path, {}, False))


def stored_layout(keys: set[str], tied: bool) -> tuple[str, str]:
    """(lm_head, embedding) as the artifact stores them: lm_head float|int8|int4, embedding
    float|shared (a tied int8 head's rows)|int8|int4."""
    head = "int8" if "lm_head.codes" in keys else "int4" if "lm_head.qweight" in keys else "none"
    if "embed.codes" in keys:
        return head, "int8"
    if "embed.qweight" in keys:
        return head, "int4"
    if tied and "embed.weight" not in keys and head == "int8":
        return head, "shared"
    return head, "float"
