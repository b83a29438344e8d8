"""The pre-quantized artifact's manifest: what `model-runtime quantize` (and the trainer) write beside
model.safetensors, and what the runtime reads to serve it with `--prequantized`."""

from __future__ import annotations

from typing import Any, Final, TypedDict

MANIFEST_FILE: Final = "quantization.json"
ARTIFACT_FORMAT: Final = "distillery-quantized"
# Bumped when a reader of an older version could not load the artifact; readers refuse newer versions.
ARTIFACT_FORMAT_VERSION: Final = 1
WEIGHTS_FILE: Final = "model.safetensors"


class ArtifactManifest(TypedDict):
    """The fields of MANIFEST_FILE."""

    format: str  # ARTIFACT_FORMAT
    format_version: int  # <= ARTIFACT_FORMAT_VERSION
    method: str  # one of values.QUANTIZED_METHODS
    group_size: int | None  # int4 only: one of values.INT4_GROUP_SIZES
    quantize_lm_head: str  # the --lm-head choice: auto | float | same
    lm_head: str  # how the head is stored: int8 | int4 | float
    source: str  # the checkpoint it was made from
    source_checksum: str  # sha256 over the source's weight files
    tool_version: str  # distillery + torch versions that wrote it
    weights_checksum: str  # sha256 of WEIGHTS_FILE
    config: dict[str, Any]  # the decoder's shape (model_runtime.config.ModelConfig fields)
    float_dtype: str  # dtype of the float tensors (norms, biases, unquantized head)


MANIFEST_FIELDS: Final[frozenset[str]] = frozenset(ArtifactManifest.__annotations__)
