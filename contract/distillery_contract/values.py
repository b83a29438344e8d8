"""The allowed values and the serving defaults, each written once.

The DistilledModel API (pydantic: enums and Literal types become the CRD's enums) and the runtime's
argparse choices both derive from these, so a value added here is accepted on both sides or on neither.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal, get_args


class QuantMethod(StrEnum):
    """Weight-only quantization of the decoder's linear layers."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


class WeightFormat(StrEnum):
    """How a checkpoint stores its weights."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"


class HardwareProfile(StrEnum):
    """Hardware presets (what a DistilledModel serves on, what a DistillationJob trains on)."""

    CPU = "cpu"
    T4 = "t4"
    L4 = "l4"
    A10G = "a10g"
    RTX4090 = "rtx4090"
    A100_40GB = "a100-40gb"
    A100_80GB = "a100-80gb"
    H100 = "h100"


QUANT_METHODS: Final[tuple[str, ...]] = tuple(m.value for m in QuantMethod)
# Methods that store integer codes (a pre-quantized artifact holds one of these).
QUANTIZED_METHODS: Final[tuple[str, ...]] = (QuantMethod.INT8.value, QuantMethod.INT4.value)
WEIGHT_FORMATS: Final[tuple[str, ...]] = tuple(f.value for f in WeightFormat)

# int4 group size: input channels per scale. 32 and 64 divide every R1-Distill dimension; 128 most.
GroupSize = Literal[32, 64, 128]
INT4_GROUP_SIZES: Final[tuple[int, ...]] = get_args(GroupSize)
DEFAULT_GROUP_SIZE: Final[GroupSize] = 128

# Activation dtype; auto: bfloat16 on CPUs and GPUs that have it, float16 on GPUs without (T4, V100).
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPES: Final[tuple[str, ...]] = get_args(Dtype)

# Decoder architectures of the R1-Distill students: qwen2 (R1-Distill-Qwen), llama (R1-Distill-Llama).
Architecture = Literal["qwen2", "llama"]
ARCHITECTURES: Final[tuple[str, ...]] = get_args(Architecture)

# Serving defaults shared by the DistilledModel API and the runtime's CLI.
DEFAULT_MAX_BATCH_SIZE: Final = 8  # sequences decoded together (continuous batching)
DEFAULT_MAX_QUEUE: Final = 32  # requests waiting for a batch slot before 429s
