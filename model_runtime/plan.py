"""The kernel plan: every data-plane choice, decided once before any module is built.

The plan is computed from the request (quantization method and group size, dtype, device, format,
pre-quantized artifact or not, the kernel override) and from the machine (CPU instruction set, CUDA
compute capability, bf16 support). Modules receive their backend from it at construction; nothing
below asks a process-wide switch or inspects the module tree afterwards. It is logged at start-up
and shown in /v1/models metadata.

Linear backends (one per quantization method, like gpt-fast's one handler per mode):
- "dense":   float nn.Linear (no quantization).
- "dq":      our CPU integer kernels (ckernels.py, AVX2/AVX-VNNI): float32 activations, fused decode.
- "aten":    PyTorch's packed CPU kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu).
- "generic": device-generic PyTorch math: int8 `F.linear(x, codes) * scales`, int4 dequantize-in-
             matmul in the activation dtype. Everything the CUDA path runs but the CUDA-only kernels;
             selectable on the CPU (DISTILLERY_CPU_KERNELS=generic or --kernel_backend generic).
- "cuda-int8": int8 weight-only on CUDA: the dequantize form (the default; fused into the matmul under
             torch.compile) or torch's `_weight_int8pack_mm` (int8_kernel says which; DISTILLERY_CUDA_INT8
             overrides).
- "cuda-int4-tinygemm": torch's tinygemm (`_convert_weight_to_int4pack` at load +
             `_weight_int4pack_mm`), sm80+ with bf16 activations.
Prefill (CPU, "dq" linears): a chunk of at least `prefill_min_rows` prompt rows runs on the CPU's
matrix engine instead of the decode kernels, with the kernel `prefill_kernel` names (prefill.py:
"int8mm" = torch._int_mm on AMX-INT8; "int8vnni" = the same int8 GEMM on our AVX512-VNNI kernel (no AMX);
"int8avx2" = our AVX2 GEMMs on CPUs with neither (int8 weights: the same int8 GEMM; int4 weights: their own
codes, not requantized); "bf16" = weights dequantized to bf16 and oneDNN's bf16 GEMM; "none" = decode kernels for
every row, as on CPUs without AVX2).
DISTILLERY_PREFILL overrides.
Documented fallback: int4 on a GPU without tinygemm (T4, sm75: no bf16) or with shapes tinygemm cannot
take runs the "generic" int4 path in fp16 (compiled when compilation is on); the plan's `notes` say why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model_runtime.config import ModelConfig

log = logging.getLogger("model_runtime.plan")

KERNEL_CHOICES = ("auto", "dq", "aten", "generic")
INT8_CUDA_KERNELS = ("auto", "int8pack_mm", "dequant")
ATEN_INT4_GROUPS = (32, 64, 128, 256)  # _weight_int4pack_mm(_for_cpu)'s group sizes
TINYGEMM_INNER_K_TILES = 8
TINYGEMM_MIN_CAPABILITY = (8, 0)


class PlanError(ValueError):
    """The request cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Machine:
    """What the plan needs to know about the hardware (tests pass a fake one, e.g. a T4)."""

    device: str                                   # "cpu" or "cuda:N"
    cuda_capability: tuple[int, int] | None = None
    cuda_name: str = ""
    dq_available: bool = False                    # our CPU kernels build and the CPU has AVX2/FMA/F16C
    dq_problem: str = ""
    dq_isa: str = ""                              # the instruction set our CPU kernels run on (ckernels.ISAS)
    dq_isa_pinned: bool = False                   # every call on it (ckernels._Lib.pinned): no one-row rerouting
    cpu_flags: frozenset[str] = frozenset()     # /proc/cpuinfo flags (which matrix engine prefill uses)
    prefill_problem: str = ""                   # why the prefill kernels' C helpers cannot load ("" = they can)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def bf16(self) -> bool:
        """Native bf16 math: Ampere (sm80) and later on CUDA; CPUs compute bf16 GEMMs in PyTorch."""
        return not self.is_cuda or (self.cuda_capability is not None and self.cuda_capability >= (8, 0))

    @classmethod
    def probe(cls, device: torch.device) -> Machine:
        if device.type == "cuda":
            idx = device.index if device.index is not None else torch.cuda.current_device()
            cap = torch.cuda.get_device_capability(idx)
            return cls(device=f"cuda:{idx}", cuda_capability=(int(cap[0]), int(cap[1])),
                       cuda_name=torch.cuda.get_device_name(idx))
        from model_runtime import ckernels, prefill

        try:
            prefill.load()
            prefill_problem = ""
        except ckernels.KernelUnavailable as exc:
            prefill_problem = str(exc)
        flags = prefill.cpu_flags()
        try:
            ckernels.load()
            return cls(device=str(device), dq_available=True, dq_isa=ckernels.isa(),
                       dq_isa_pinned=ckernels.isa_pinned(), cpu_flags=flags,
                       prefill_problem=prefill_problem)
        except ckernels.KernelUnavailable as exc:
            return cls(device=str(device), dq_available=False, dq_problem=str(exc), cpu_flags=flags,
                       prefill_problem=prefill_problem)


@dataclass(frozen=True)
class KernelPlan:
    device: str
    float_dtype: torch.dtype        # float weights (norms, a float head/embedding)
    act_dtype: torch.dtype          # activations between the layers
    kv_dtype: torch.dtype
    quantization: str               # none | int8 | int4 (the decoder's linears)
    group_size: int | None          # int4 only (the requested one; tiny K uses smaller, int4_group_size)
    lm_head: str                    # float | int8 | int4
    embedding: str                  # float | shared | int8 | int4
    backend: str                    # the decoder linears' backend
    lm_head_backend: str
    int8_kernel: str = ""           # cuda-int8 only: int8pack_mm | dequant
    fused_decode: bool = False      # decode steps through Block.decode_fused (dq everywhere)
    compile: bool = False           # torch.compile the decode step
    prefill_kernel: str = "none"    # dq linears, >= prefill_min_rows rows: none | int8mm | int8vnni | int8avx2 | bf16
    prefill_min_rows: int = 0
    dq_isa: str = ""                # dq linears: avx2 | avxvnni | avx512vnni (the decode kernels' instruction set)
    dq_row_isa: tuple[str, str] = ("", "")  # one activation row, int8 / int4 weights: row_isas ("" = dq_isa's)
    decode_row_tile: int = 0        # activation rows the dq batch kernels take a pass (decode_row_tile()); 0: none
    sampler: str = "torch"          # a step's rows of logits: torch (max, then each row's _sample) | dq (one C call,
                                    # sampling.scan_rows) where the dq kernels are loaded
    source_format: str = "hf"
    prequantized: bool = False
    machine: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def backend_for(self, name: str) -> str:
        return self.lm_head_backend if name == "lm_head" else self.backend

    def method_for(self, name: str) -> str:
        if name == "lm_head":
            return "none" if self.lm_head == "float" else self.lm_head
        return self.quantization

    def describe(self) -> dict[str, Any]:
        """JSON-friendly (the start-up log line and /v1/models metadata)."""
        out = asdict(self)
        for k in ("float_dtype", "act_dtype", "kv_dtype"):
            out[k] = str(out[k]).removeprefix("torch.")
        out["notes"] = list(self.notes)
        out["dq_row_isa"] = list(self.dq_row_isa)
        return out


def lm_head_method(quantization: str, quantize_lm_head: bool | None) -> str:
    """lm_head's quantization. None (auto): int8 whenever the decoder is quantized. The head is
    ~28% of the 0.5B model's weight bytes read per token, and per-channel int8 keeps it close to
    float (llama.cpp's Q4_K_M likewise keeps the output layer at higher precision).
    True: the decoder's method; False: float ("none")."""
    if quantization == "none" or quantize_lm_head is False:
        return "none"
    return quantization if quantize_lm_head else "int8"


def embedding_method(quantization: str, tied: bool, head_method: str) -> str:
    """How the token embedding is stored: "float", "shared" (a tied model's int8 head rows serve as
    the embedding: one copy), "int8" (per row) or "int4" (group-wise, for int4 models: llama.cpp's
    Q4_K_M keeps token_embd at 4-5 bits too). A lookup reads one row per token: the width costs
    no speed, only memory (151936 x 1536: bf16 467 MB, int8 233 MB, int4 124 MB)."""
    if quantization == "none" or (tied and head_method == "none"):
        return "float"  # (a tied float head is the embedding's own weight)
    if tied and head_method == "int8":
        return "shared"
    return "int4" if quantization == "int4" else "int8"


def int4_group_size(k: int, group_size: int) -> int:
    """The requested group size, or the largest smaller supported one dividing K (tiny models)."""
    from distillery_contract.values import INT4_GROUP_SIZES

    for g in sorted({group_size, *INT4_GROUP_SIZES}, reverse=True):
        if g <= group_size and k % g == 0:
            return int(g)
    raise ValueError(f"in_features {k} is not a multiple of any int4 group size {INT4_GROUP_SIZES}")


def _in_features(cfg: ModelConfig) -> tuple[int, ...]:
    """K of every decoder linear: qkv/gate_up (hidden), o (heads x head_dim), down (intermediate)."""
    return (cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.intermediate_size)


def _dq_fits(method: str, ks: tuple[int, ...], group_size: int) -> bool:
    from model_runtime import ckernels

    if method == "int8":
        return all(k % 32 == 0 for k in ks)
    return all(k % 64 == 0 and ckernels.w4_group_supported(int4_group_size(k, group_size), k) for k in ks)


def _cpu_backend(method: str, ks: tuple[int, ...], group_size: int, choice: str, machine: Machine,
                 notes: list[str]) -> str:
    if method == "none":
        return "dense"
    if choice == "generic":
        return "generic"
    if choice in ("auto", "dq"):
        if not machine.dq_available:
            if choice == "dq":
                raise PlanError(f"--kernel_backend/DISTILLERY_CPU_KERNELS=dq but our CPU kernels are unavailable: "
                                f"{machine.dq_problem}")
            notes.append(f"CPU integer kernels unavailable ({machine.dq_problem}): PyTorch's packed kernels")
        elif _dq_fits(method, ks, group_size):
            return "dq"
        elif choice == "dq":
            raise PlanError(f"the CPU integer kernels cannot take {method} with in_features {ks} "
                            f"(group {group_size})")
        else:
            notes.append(f"{method}: shapes {ks} do not fit the CPU integer kernels; PyTorch's packed kernels")
    if method == "int4" and any(int4_group_size(k, group_size) not in ATEN_INT4_GROUPS for k in ks):
        notes.append("int4: a group size PyTorch's CPU kernel lacks; the generic dequantize-in-matmul path")
        return "generic"
    return "aten"


def _cuda_backend(method: str, ks: tuple[int, ...], group_size: int, choice: str, float_dtype: torch.dtype,
                  machine: Machine, notes: list[str]) -> str:
    if method == "none":
        return "dense"
    if choice == "generic":
        return "generic"
    if choice in ("dq", "aten"):
        raise PlanError(f"kernel backend {choice!r} is a CPU backend; on {machine.device} use auto or generic")
    if method == "int8":
        return "cuda-int8"
    cap = machine.cuda_capability or (0, 0)
    groups = [int4_group_size(k, group_size) for k in ks]
    why = ""
    if cap < TINYGEMM_MIN_CAPABILITY:
        why = f"tinygemm needs sm80+, {machine.cuda_name or machine.device} is sm{cap[0]}{cap[1]}"
    elif float_dtype != torch.bfloat16:
        why = f"tinygemm takes bfloat16 activations, the plan's dtype is {float_dtype}"
    elif any(g not in ATEN_INT4_GROUPS for g in groups) or any(k % (TINYGEMM_INNER_K_TILES * 16) for k in ks):
        why = f"tinygemm cannot take in_features {ks} with groups {groups}"
    if why:
        notes.append(f"int4: {why}; the generic dequantize-in-matmul path (documented fallback)")
        return "generic"
    return "cuda-int4-tinygemm"


def make_plan(cfg: ModelConfig, machine: Machine, *, quantization: str = "none", group_size: int = 128,
              lm_head: str = "none", embedding: str = "float", dtype: torch.dtype | None = None,
              kernels: str | None = None, compile: bool | None = None, int8_kernel: str | None = None,
              source_format: str = "hf", prequantized: bool = False) -> KernelPlan:
    """Decide the plan. lm_head / embedding: what lm_head_method / embedding_method (or the
    artifact's stored tensors) say; dtype None: auto (fp16 on CUDA without bf16, else bf16)."""
    choice = (kernels or os.environ.get("DISTILLERY_CPU_KERNELS") or "auto").lower()
    if choice not in KERNEL_CHOICES:
        raise PlanError(f"kernel backend {choice!r}: expected one of {', '.join(KERNEL_CHOICES)} "
                        f"(--kernel_backend / DISTILLERY_CPU_KERNELS)")
    notes: list[str] = []
    if dtype is None:
        dtype = torch.bfloat16 if machine.bf16 else torch.float16
    elif dtype == torch.bfloat16 and not machine.bf16:
        # as the operator's validation (spec.serving.dtype on GPUs without bf16): refused, not emulated
        raise PlanError(f"{machine.cuda_name or machine.device} has no bfloat16 support: use float16 or auto")
    ks = _in_features(cfg)
    head_ks = (cfg.hidden_size,)
    if machine.is_cuda:
        backend = _cuda_backend(quantization, ks, group_size, choice, dtype, machine, notes)
        head = _cuda_backend(lm_head, head_ks, group_size, choice, dtype, machine, notes)
    else:
        backend = _cpu_backend(quantization, ks, group_size, choice, machine, notes)
        head = _cpu_backend(lm_head, head_ks, group_size, choice, machine, notes)
    fused = backend == "dq" and head == "dq"
    if (backend == "dq") != (head == "dq"):
        notes.append("the decoder and lm_head run on different backends: no fused decode step")
    if compile is None:
        env = os.environ.get("DISTILLERY_COMPILE", "").lower()
        compile = env in ("1", "true", "yes") if env else machine.is_cuda
    if compile and fused:
        notes.append("compilation off: the fused CPU decode step has no per-op overhead to remove")
        compile = False
    kernel8 = ""
    if "cuda-int8" in (backend, head):
        kernel8 = (int8_kernel or os.environ.get("DISTILLERY_CUDA_INT8") or "auto").lower()
        if kernel8 not in INT8_CUDA_KERNELS:
            raise PlanError(f"DISTILLERY_CUDA_INT8={kernel8!r}: expected one of {', '.join(INT8_CUDA_KERNELS)}")
        if kernel8 == "auto":
            # compiled, inductor fuses the int8->float conversion into a one-row matmul (gpt-fast). Eager too:
            # torch's int8pack kernel (one thread per output) took 21.1 ms a step on an H200 (1.5B shape,
            # batch 1, CUDA graphs) against 3.1 ms for everything of "dequant" before that fusion; eager,
            # dequant writes a float copy per call, ~3 extra bytes a weight (~1 ms there, by arithmetic)
            kernel8 = "dequant"
    act = torch.float32 if fused else dtype
    prefill_kernel, prefill_rows = _prefill_choice(backend, head, quantization, machine, notes)
    kv = torch.float32 if not machine.is_cuda else dtype
    return KernelPlan(
        device=machine.device, float_dtype=dtype, act_dtype=act, kv_dtype=kv, quantization=quantization,
        group_size=group_size if quantization == "int4" or lm_head == "int4" else None,
        lm_head="float" if lm_head == "none" else lm_head, embedding=embedding, backend=backend,
        lm_head_backend=head, int8_kernel=kernel8, fused_decode=fused, compile=bool(compile),
        prefill_kernel=prefill_kernel, prefill_min_rows=prefill_rows,
        dq_isa=machine.dq_isa if "dq" in (backend, head) else "",
        dq_row_isa=row_isas(machine) if "dq" in (backend, head) else ("", ""),
        decode_row_tile=decode_row_tile(backend, quantization, machine),
        sampler="dq" if "dq" in (backend, head) else "torch",
        source_format=source_format, prequantized=prequantized,
        machine=machine.cuda_name or machine.device, notes=tuple(notes))


def row_isas(machine: Machine) -> tuple[str, str]:
    """The kernels one activation row (a single-stream decode step) of int8 / int4 weights takes where the chosen
    set is AVX-512 and not pinned ("": its own; ckernels.ROW_ISAS; a set forced by DISTILLERY_CPU_ISA, or being
    compared by using_isa, runs every call). All are bit-identical; this is speed only. Measured as a
    0.5B decode step at batch 1, each set alone in one process, alternating (bench `kernels`' per-set rows):
    - int8: the 256-bit VNNI kernels (|w| . sign(x, w), one vpdpbusd per 32 weights) beat the 512-bit ones
      (x + 128 and a second vpdpbusd for the weight sum, AVX-512 lacking vpsignb) on every CPU measured: Xeon
      19.0-19.4 vs 22.4-23.6 ms, Zen 5 12.4-15.3 vs 17.7-18.8, Zen 4 (no AVX-VNNI: the EVEX-encoded ones) 13.5
      vs 27.5, and still 16.8 vs 19.3 (alternating, one process) once the 512-bit one prefetched into L2 and read the
      prepared block sums (one vpdpbusd per 64 weights);
    - int4: the 512-bit kernels win on full-width AVX-512 (Xeon 14.7-16.4 vs 17.5-21.2 ms for the 256-bit
      sets; Zen 5 10.2 vs 12.5-17.5 in one run, 12.1 vs 11.6-13.1 in another), and on Zen 4 (AVX-512 as two
      halves) since their weight prefetch goes to L2: 11.5-11.8 vs AVX2's 12.8-13.1 (prefetched into L1 they
      lost there, 18.4 vs 13.3: the 0.5B's 96 int4 one-row calls streamed at 8.8 ms vs AVX2's 7.5; into L2 5.9).
    From two rows on the 512-bit kernels win or tie everywhere (Zen 4 in session 8, int8 / int4 at 2 rows: 17.7 /
    14.4 ms vs AVX2's 17.4 / 15.6; int8 batches of 4+ rows now take the 8-row kernel, 8 rows 29.6-30.5 -> 19.2-20.0
    ms)."""
    if machine.dq_isa != "avx512vnni" or machine.dq_isa_pinned:  # DISTILLERY_CPU_ISA / a comparison of sets
        return "", ""
    return "vnni256", ""


def decode_row_tile(backend: str, quantization: str, machine: Machine) -> int:
    """Activation rows the decoder's batch kernels compute in one pass over the weights: on AVX512-VNNI, int8 from 4
    rows and int4 from 5 take tiles of 8 rows (a tile costs about the same whatever its rows: the 0.5B's int4 linears
    17.1-19.9 ms at 5-8 rows, 31.0 at 12, 33.2 at 16; int8 layers 22.75 ms at 8 rows, 32.41 at 16). Elsewhere
    (AVX2's kernels: 1-4 rows a pass, compute-bound from a few rows on the CPUs measured) every row costs: 0.
    The engine fills a tile with a long prompt's rows (Engine._long_prompt_tokens)."""
    if backend != "dq" or quantization not in ("int8", "int4") or machine.dq_isa != "avx512vnni":
        return 0
    return 8


def _prefill_choice(backend: str, head: str, quantization: str, machine: Machine,
                    notes: list[str]) -> tuple[str, int]:
    """The prompt-chunk GEMM of the dq linears, from the CPU's matrix engines (prefill.choose_kernel), for int8
    and, with a matrix engine, int4 alike: measured per 0.5B layer shape at 256 rows on an AVX512-VNNI Xeon (bench
    `prefill`'s kernel table), torch._int_mm beats the dq kernels for int4 too (1.07-1.65x, its per-call int4->int8
    requantization included) and end to end (TTFT on 1,000 tokens 6.5 s vs 10.4 s); on AVX2 alone int4 weights
    take pf_w4_gemm_avx2 on their own codes ("int8avx2": requantized they were no faster than the decode kernels
    there; their own codes ~1.3x; prefill.py). DISTILLERY_PREFILL=none keeps prompt chunks on the decode kernels."""
    if "dq" not in (backend, head):
        return "none", 0
    from model_runtime import prefill

    override = os.environ.get("DISTILLERY_PREFILL", "").lower() or None
    kernel, why = prefill.choose_kernel(machine.cpu_flags, override, quantization)
    if kernel != "none" and machine.prefill_problem:
        notes.append(f"prefill: {why}, but its helpers are unavailable ({machine.prefill_problem}): decode kernels")
        return "none", 0
    notes.append(f"prefill: {why}")
    return kernel, prefill.PREFILL_MIN_ROWS if kernel != "none" else 0


def log_plan(plan: KernelPlan) -> None:
    log.info("kernel plan: %s", plan.describe(), extra={"kernel_plan": plan.describe()})
