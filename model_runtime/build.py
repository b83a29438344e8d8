"""Build the Transformer a KernelPlan describes from a TensorSource, one tensor at a time.

Every module is made on "meta" first and replaced by its loaded form directly on the plan's device:
float weights are read and moved; quantized ones are quantized a chunk of rows at a time on that
device (or rebuilt from stored codes); the linears get the plan's backend at construction. Nothing
is decided here that the plan did not say, and check_placement proves every tensor landed on the
planned device with the planned dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from model_runtime import ckernels, quant
from model_runtime.config import ModelConfig
from model_runtime.kernels import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from model_runtime.load_error import ModelLoadError
from model_runtime.model import Block, RMSNorm, Transformer
from model_runtime.plan import KernelPlan
from model_runtime.tensor_source import TensorSource

_CODE_DTYPES = {"codes": torch.int8, "qweight": torch.uint8, "scales": torch.bfloat16, "zeros": torch.bfloat16}


def has_own_head(src: TensorSource) -> bool:
    """False for a checkpoint that stores no lm_head (tied to the embedding, whatever config.json says)."""
    return src.has("lm_head.weight") or any(k.startswith("lm_head.") for k in src.available)


def build_model(cfg: ModelConfig, src: TensorSource, plan: KernelPlan, *, max_len: int, keep_codes: bool = False,
                progress: Callable[[list[str]], Any] | None = None) -> Transformer:
    """Materialise a Transformer from `src` as `plan` says (cfg.tie_word_embeddings already set from
    has_own_head by the caller)."""
    device, dtype = plan.torch_device, plan.float_dtype
    with torch.device("meta"):
        model = Transformer(cfg)
    modules = list(model.named_modules())
    # the two vocabulary-sized matrices first, while nothing else is resident: their load-time
    # transients then never stack on top of the whole decoder (peak RSS)
    names = sorted((n for n, _ in modules if n), key=lambda n: n not in ("embed", "lm_head"))
    for name in progress(names) if progress else names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            _load_linear(model, name, module, src, plan, keep_codes)
        elif name == "embed" and plan.embedding != "float":
            _load_quantized_embedding(model, src, plan)
        elif isinstance(module, (nn.Embedding, RMSNorm)):
            w = src.get(f"{name}.weight")
            if tuple(w.shape) != tuple(module.weight.shape):
                raise ModelLoadError(f"{name}: weight shape {tuple(w.shape)} != expected {tuple(module.weight.shape)}")
            # norms run in the activation dtype (float32 on the fused CPU path: a few KiB)
            wdt = plan.act_dtype if isinstance(module, RMSNorm) else dtype
            module.weight = nn.Parameter(w.to(device=device, dtype=wdt), requires_grad=False)
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.is_meta:
        # a float head tied to the (float) embedding
        model.lm_head.weight = cast(nn.Embedding, model.embed).weight
    if plan.embedding == "shared":
        # tied and int8: the embedding is the int8 lm_head's rows (one copy for both)
        if not isinstance(model.lm_head, Int8Linear):
            raise ModelLoadError("the plan shares the embedding with an int8 lm_head, but the head is not int8")
        model.embed = Int8Embedding(model.lm_head.codes, model.lm_head.scales, plan.act_dtype)
    if isinstance(model.embed, (Int8Embedding, Int4Embedding)):
        model.embed.out_dtype = plan.act_dtype  # dequantized straight to the activation dtype
    model.set_rope(max_len, device)
    model.float_dtype = dtype
    model.act_dtype = plan.act_dtype
    model.kv_dtype = plan.kv_dtype
    model.fused_decode = plan.fused_decode
    if plan.dq_isa:  # one-row calls' kernels (process-wide, as the instruction set: every model here has this plan's)
        ckernels.set_row_isas(*plan.dq_row_isa)
    for block in cast("Iterable[Block]", model.layers):  # prompt rows on the fused linears too (Block.fused_rows)
        block.fused_rows = plan.fused_decode
    model = model.eval().requires_grad_(False)
    problems = placement_problems(model, plan)
    if problems:
        raise ModelLoadError("the built model does not match its plan: " + "; ".join(problems[:5]))
    return model


def _load_linear(model: Transformer, name: str, module: nn.Linear, src: TensorSource, plan: KernelPlan,
                 keep_codes: bool) -> None:
    device, dtype = plan.torch_device, plan.float_dtype
    backend = plan.backend_for(name)
    stored = quant.linear_from_state(name, src.available, src.get, dtype, device, backend=backend,
                                     int8_kernel=plan.int8_kernel, keep_codes=keep_codes,
                                     prefill_kernel=plan.prefill_kernel, prefill_min_rows=plan.prefill_min_rows)
    if stored is not None:
        model.set_submodule(name, stored)
        return
    wname = f"{name}.weight"
    method = plan.method_for(name)
    if name == "lm_head" and not src.has(wname):
        wname = "embed.weight"  # tied
        if method == "none":
            return  # tied to the float embedding after the loop
    if not src.has(wname):
        raise ModelLoadError(f"the checkpoint has no weight for {name} ({src.mapping.get(wname, [wname])})")
    weight = src.lazy(wname) if method != "none" else src.get(wname)
    bias = src.get(f"{name}.bias").to(device) if module.bias is not None and src.has(f"{name}.bias") else None
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ModelLoadError(f"{name}: weight shape {tuple(weight.shape)} != expected {expected}")
    if method != "none":
        group = plan.group_size or 128
        model.set_submodule(name, quant.quantize_linear(weight, bias, method, group, dtype, keep_codes,
                                                        backend=backend, int8_kernel=plan.int8_kernel,
                                                        device=device, prefill_kernel=plan.prefill_kernel,
                                                        prefill_min_rows=plan.prefill_min_rows))
        return
    new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    # method "none": src.get() gave the whole tensor, not LazyRows
    new.weight = nn.Parameter(cast(Tensor, weight).to(device=device, dtype=dtype), requires_grad=False)
    if module.bias is not None:
        b = bias if bias is not None else torch.zeros(module.out_features)
        new.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
    model.set_submodule(name, new)


def _load_quantized_embedding(model: Transformer, src: TensorSource, plan: KernelPlan) -> None:
    """A stored int8/int4 embedding is rebuilt; a "shared" one waits for the int8 head (after the
    loop); otherwise the float rows are quantized a chunk at a time on the device."""
    device, keys = plan.torch_device, src.available
    if plan.embedding == "shared":
        return
    if "embed.codes" in keys:
        model.embed = Int8Embedding(src.get("embed.codes").to(device), src.get("embed.scales").to(device),
                                    plan.act_dtype)
        return
    if "embed.qweight" in keys:
        model.embed = Int4Embedding(src.get("embed.qweight").to(device), src.get("embed.scales").to(device),
                                    src.get("embed.zeros").to(device), plan.act_dtype)
        return
    if not src.has("embed.weight"):
        raise ModelLoadError(f"the checkpoint has no token embedding ({src.mapping.get('embed.weight', ['embed.weight'])})")
    weight = src.lazy("embed.weight")
    cfg = model.config
    if tuple(weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelLoadError(f"embed: weight shape {tuple(weight.shape)} != expected {(cfg.vocab_size, cfg.hidden_size)}")
    model.embed = (Int4Embedding.from_weight(weight, plan.group_size or 128, plan.act_dtype, device=device)
                   if plan.embedding == "int4" else Int8Embedding.from_weight(weight, plan.act_dtype, device=device))


def _expected_dtype(module: nn.Module, tname: str, plan: KernelPlan) -> torch.dtype | None:
    if isinstance(module, RMSNorm):
        return plan.act_dtype
    if isinstance(module, (Int8Linear, Int4Linear, Int8Embedding, Int4Embedding)):
        return plan.float_dtype if tname == "bias" else _CODE_DTYPES.get(tname)
    return plan.float_dtype


def placement_problems(model: Transformer, plan: KernelPlan) -> list[str]:
    """Every parameter, buffer and cached tensor (kernel layouts, RoPE tables) on the plan's device;
    parameters and buffers in the planned dtype. Empty when the model is as planned."""
    device = plan.torch_device
    problems: list[str] = []

    def same_device(t: Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    for mname, module in model.named_modules():
        tensors = [(n, t, True) for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, True) for n, t in module.named_buffers(recurse=False)]
        tensors += [(n, t, False) for n, t in vars(module).items() if isinstance(t, Tensor)]
        for tname, t, typed in tensors:
            where = f"{mname}.{tname}" if mname else tname
            if t.is_meta:
                problems.append(f"{where} was never loaded")
            elif not same_device(t):
                problems.append(f"{where} is on {t.device}, the plan says {device}")
            elif typed:
                want = _expected_dtype(module, tname, plan)
                if want is not None and t.dtype != want:
                    problems.append(f"{where} is {t.dtype}, the plan says {want}")
    return problems
