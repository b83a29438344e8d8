"""The decoder's shape: one dataclass read from a Hugging Face config.json (or GGUF metadata).

Covers the DeepSeek-R1-Distill students: Qwen2 (q/k/v bias, often tied embeddings on small
models) and Llama (no bias, llama3 RoPE scaling on R1-Distill-Llama).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from distillery_contract.values import ARCHITECTURES

SUPPORTED_ARCHS = ARCHITECTURES


@dataclass
class ModelConfig:
    arch: str = "qwen2"                 # "qwen2" | "llama"
    hidden_size: int = 896
    n_layers: int = 24
    n_heads: int = 14
    n_kv_heads: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position: int = 32768
    qkv_bias: bool = True
    head_dim: int = 0                   # 0 => hidden_size // n_heads
    rope_scaling: dict[str, Any] | None = field(default=None)  # llama3: factor, low/high_freq_factor, ...

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a transformers config.json dict (4.x `rope_theta` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        rope: dict[str, Any] = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = (scaling or rope).get("rope_type") or (scaling or rope).get("type")
        if rope_type in (None, "default"):
            scaling = None
        elif rope_type == "llama3":
            scaling = dict(scaling or rope)
        else:
            raise ValueError(f"unsupported RoPE scaling {rope_type!r} (supported: default, llama3)")
        n_heads = int(cfg["num_attention_heads"])
        return cls(
            arch=model_type,
            hidden_size=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(theta),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            head_dim=int(cfg.get("head_dim") or 0),
            rope_scaling=scaling,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers-style config.json dict (written next to quantized artifacts)."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.arch == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.arch,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
        }
        if self.arch == "llama":
            out["attention_bias"] = self.qkv_bias
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
