"""prefill.py + csrc/prefill_kernels.c: prompt chunks of the quantized linears on the CPU's matrix engine
(torch._int_mm / our AVX512-VNNI or AVX2 GEMM / bf16 GEMM), chosen by the KernelPlan from the CPU's features; decode
rows stay on the dq kernels."""

from __future__ import annotations

import pytest
import torch

from model_runtime import kernels, prefill
from model_runtime.config import ModelConfig
from model_runtime.kernels import Int4Linear, Int8Linear
from model_runtime.loader import load_model
from model_runtime.plan import Machine, make_plan
from tests.cpu_kernels import needs_cpu_kernels
from tests.unit.runtime.test_quant import greedy

CFG = ModelConfig(arch="qwen2", hidden_size=896, n_layers=2, n_heads=14, n_kv_heads=2, intermediate_size=4864,
                  vocab_size=1000, max_position=4096)  # the 0.5B's linear shapes
AVX2_ONLY = frozenset({"avx2", "fma", "f16c", "avx_vnni"})
NO_AVX2 = frozenset({"sse4_2", "avx"})
AVX512_BF16 = frozenset({*AVX2_ONLY, "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"})
AMX = frozenset({*AVX512_BF16, "amx_tile", "amx_int8", "amx_bf16"})
# a prompt longer than PREFILL_MIN_ROWS, so its chunk takes the prefill GEMM
LONG_PROMPT = [151646, 151644, *range(1000, 1030), 151645]


needs_kernels = needs_cpu_kernels
# pf_w8_gemm's own code (elsewhere "int8vnni" multiplies on _int_mm, so a comparison of the two could not fail)
needs_vnni512 = pytest.mark.skipif(not (prefill.cpu_flags() >= prefill.VNNI512_FLAGS),
                                   reason="pf_w8_gemm needs AVX512-VNNI/BW/VL/DQ, which this CPU lacks")


def _where_it_runs(kernel: str):
    """kernel as a test parameter, skipped on a CPU lacking what our GEMM of that name needs (a load refuses
    DISTILLERY_PREFILL=int8vnni there; a direct call would compare _int_mm with itself)."""
    flags = prefill.OWN_GEMM_FLAGS.get(kernel, frozenset())
    return pytest.param(kernel, marks=pytest.mark.skipif(not prefill.cpu_flags() >= flags,
                                                         reason=f"{kernel}'s code needs {', '.join(sorted(flags))}"))


OWN_GEMMS = [_where_it_runs(g) for g in prefill.OWN_GEMM_FLAGS]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("DISTILLERY_CPU_KERNELS", "DISTILLERY_PREFILL", "DISTILLERY_COMPILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("flags", "kernel"), [(NO_AVX2, "none"), (AVX2_ONLY, "int8avx2"), (AVX512_BF16, "int8vnni"),
                                               (AMX, "int8mm"), (AVX512_BF16 - {"avx512bw"}, "int8mm")])
def test_the_plan_picks_the_prefill_kernel_from_the_cpu_features(flags, kernel):
    plan = make_plan(CFG, Machine("cpu", dq_available=True, cpu_flags=flags), quantization="int8", lm_head="int8")
    assert plan.prefill_kernel == kernel
    assert plan.prefill_min_rows == (prefill.PREFILL_MIN_ROWS if kernel != "none" else 0)
    assert any(n.startswith("prefill:") for n in plan.notes)
    assert plan.describe()["prefill_kernel"] == kernel  # shown in /v1/models kernel_plan


def test_no_prefill_kernel_off_the_dq_backend_or_without_its_helpers(monkeypatch):
    machine = Machine("cpu", dq_available=True, cpu_flags=AMX)
    # int4 takes the matrix engine as int8 does (measured faster per shape, requantization included)
    assert make_plan(CFG, machine, quantization="int4", lm_head="int8").prefill_kernel == "int8mm"
    # and on AVX2 alone the AVX2 GEMMs: int4 weights on their own codes (pf_w4_gemm_avx2), not requantized
    avx2 = Machine("cpu", dq_available=True, cpu_flags=AVX2_ONLY)
    plan4 = make_plan(CFG, avx2, quantization="int4", lm_head="int8")
    assert plan4.prefill_kernel == "int8avx2" and any("pf_w4_gemm_avx2" in n for n in plan4.notes)
    assert make_plan(CFG, avx2, quantization="int8", lm_head="int8").prefill_kernel == "int8avx2"
    assert make_plan(CFG, machine, quantization="int8", kernels="aten").prefill_kernel == "none"
    assert make_plan(CFG, machine, quantization="none").prefill_kernel == "none"
    assert make_plan(CFG, Machine("cuda:0", cuda_capability=(8, 0)), quantization="int8").prefill_kernel == "none"
    broken = Machine("cpu", dq_available=True, cpu_flags=AMX, prefill_problem="no C compiler")
    plan = make_plan(CFG, broken, quantization="int8", lm_head="int8")
    assert plan.prefill_kernel == "none" and any("no C compiler" in n for n in plan.notes)
    monkeypatch.setenv("DISTILLERY_PREFILL", "bf16")
    assert make_plan(CFG, machine, quantization="int8", lm_head="int8").prefill_kernel == "bf16"
    monkeypatch.setenv("DISTILLERY_PREFILL", "none")
    assert make_plan(CFG, machine, quantization="int4", lm_head="int8").prefill_kernel == "none"
    monkeypatch.setenv("DISTILLERY_PREFILL", "fast")
    with pytest.raises(ValueError, match="DISTILLERY_PREFILL"):
        make_plan(CFG, machine, quantization="int8", lm_head="int8")
    monkeypatch.setenv("DISTILLERY_PREFILL", "int8vnni")  # its code would not run there: refused, not a crash
    assert make_plan(CFG, machine, quantization="int8", lm_head="int8").prefill_kernel == "int8vnni"
    with pytest.raises(ValueError, match="int8vnni: this CPU lacks avx512_vnni"):
        make_plan(CFG, Machine("cpu", dq_available=True, cpu_flags=AVX2_ONLY), quantization="int8", lm_head="int8")
    monkeypatch.setenv("DISTILLERY_PREFILL", "int8avx2")
    assert make_plan(CFG, machine, quantization="int8", lm_head="int8").prefill_kernel == "int8avx2"
    with pytest.raises(ValueError, match="int8avx2: this CPU lacks avx2, fma"):
        make_plan(CFG, Machine("cpu", dq_available=True, cpu_flags=NO_AVX2), quantization="int8", lm_head="int8")


def _chunked(w: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's reference: each chunk of `chunk` values of a row rounded on its own amax / 127 scale."""
    codes, scales = [], []
    for part in w.split(chunk, dim=1):
        d = part.abs().amax(1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        codes.append(torch.round(part * inv[:, None]).to(torch.int8))
        scales.append(d)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


@needs_kernels
@pytest.mark.parametrize(("k", "chunk"), [(896, prefill.CHUNK_K), (2560, 1024), (256, 64), (100, 64)])  # 100: 8-lane tails
def test_activation_rows_quantize_like_torch_per_chunk(k, chunk):
    x = torch.randn(19, k) * torch.logspace(-3, 2, 19)[:, None]
    x[3] = 0.0
    x[5, : min(chunk, k)] = 0.0  # a zero chunk: scale 0, codes 0
    q, xs = prefill.quantize_rows(x, chunk)
    ref_q, ref_s = _chunked(x, chunk)
    assert xs.shape == (19, -(-k // chunk))
    assert torch.equal(xs, ref_s) and torch.equal(q, ref_q)


def _int4_module(n: int, k: int, group: int) -> tuple[Int4Linear, torch.Tensor]:
    qweight, s, z = kernels.quantize_int4_packed(torch.randn(n, k) * 0.02, group)
    lin = Int4Linear(qweight, s, z, None, torch.float32, keep_codes=True, backend="dq")
    return lin, kernels.dequantize_int4(kernels.unpack_nibbles(qweight), s, z)


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_dequant_is_bit_exact_with_the_portable_dequantize(group):
    lin, w = _int4_module(40, 256, group)
    assert torch.equal(prefill.w4_to_bf16(lin._packed, lin._dq_scales, lin._dq_zeros, group), w.to(torch.bfloat16))
    for chunk in (prefill.CHUNK_K, 128, 192):  # one chunk; two of 128; 192 + a partial 64
        codes, ws = prefill.w4_to_i8(lin._packed, lin._dq_scales, lin._dq_zeros, group, chunk)
        ref_codes, ref_scales = _chunked(w, chunk)
        assert torch.equal(ws, ref_scales.t()) and torch.equal(codes, ref_codes)


@needs_kernels
@pytest.mark.parametrize(("group", "chunk"), [(32, 512), (64, 192), (128, 512), (128, 256), (128, 384)])
def test_int4_requantization_by_table_matches_value_by_value_on_any_codes(group, chunk):
    """The table path (16 codes per group, a chunk's amax from each group's smallest / largest code) on arbitrary
    nibbles, scales of either sign and zero points: the bytes and scales of the value-by-value reference."""
    torch.manual_seed(1)
    n, k = 24, 896
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    packed[3] = 0x88  # every code 8: values are the zero points only
    packed[4, :32] = 0xF0  # one block with the low nibbles 0 and the high ones 15
    s = (torch.randn(n, k // group) * 0.01).to(torch.bfloat16)
    z = (torch.randn(n, k // group) * 0.01).to(torch.bfloat16)
    s[5] = 0.0
    z[5] = 0.0  # an all-zero row: scale 0, codes 0
    lin = Int4Linear(packed, s, z, None, torch.float32, keep_codes=True, backend="dq")
    w = kernels.dequantize_int4(kernels.unpack_nibbles(packed), s, z)
    codes, ws = prefill.w4_to_i8(lin._packed, lin._dq_scales, lin._dq_zeros, group, chunk)
    ref_codes, ref_scales = _chunked(w, chunk)
    assert torch.equal(ws, ref_scales.t()) and torch.equal(codes, ref_codes)


@needs_kernels
@pytest.mark.parametrize("kernel", ["int8mm", "int8vnni", "int8avx2", "bf16"])
def test_prefill_gemms_match_the_float_product_and_add_into_out(kernel):
    torch.manual_seed(0)
    x, bias = torch.randn(24, 2560), torch.randn(48)  # K of three chunks, the last one partial
    lin4, w4 = _int4_module(48, 2560, 64)
    codes, scales = kernels.quantize_int8(torch.randn(48, 2560) * 0.02)
    w8 = codes.float() * scales.float()[:, None]
    for w, run in ((w8, lambda out: prefill.linear_w8(kernel, x, codes, scales.float(), bias, out=out)),
                   (w4, lambda out: prefill.linear_w4(kernel, x, lin4._packed, lin4._dq_scales, lin4._dq_zeros, 64,
                                                      bias, out=out))):
        assert x.shape[1] > 2 * max(prefill.CHUNK_K, prefill.W8_CHUNK_K)
        ref = x @ w.t() + bias
        y = run(None)
        assert (y - ref).norm() / ref.norm() < 0.02
        resid = torch.randn(24, 48)
        assert torch.allclose(run(resid.clone()), resid + y, atol=1e-5)


def _chunked_product(x: torch.Tensor, codes: torch.Tensor, ws: torch.Tensor, chunk: int) -> torch.Tensor:
    """x's rows quantized per chunk of `chunk` values, times int8 codes with one scale per output channel: the
    integer products exact (float64), each chunk's scaled by its row scale and the channel scale."""
    q, xs = _chunked(x, chunk)
    y = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float64)
    for c, (qc, wc) in enumerate(zip(q.split(chunk, dim=1), codes.split(chunk, dim=1), strict=True)):
        y += (qc.double() @ wc.double().t()) * xs[:, c:c + 1].double()
    return y * ws.double()


@needs_kernels
@pytest.mark.parametrize("kernel", prefill.INT8_GEMMS)
def test_int8_weights_share_one_activation_scale_per_w8_chunk(kernel):
    """int8 weights have no chunk of their own: their prompt rows take one activation scale per W8_CHUNK_K values
    (a K = 896 layer in one _int_mm and one scaling pass), not int4's CHUNK_K."""
    torch.manual_seed(3)
    k = 2 * prefill.W8_CHUNK_K + 384  # two whole chunks and a partial one
    x = torch.randn(20, k) * torch.linspace(0.1, 3, k)  # ramped: chunks of the same row get different scales
    codes, scales = kernels.quantize_int8(torch.randn(36, k) * 0.02)
    y = prefill.linear_w8(kernel, x, codes, scales.float(), None).double()
    ref = _chunked_product(x, codes, scales.float(), prefill.W8_CHUNK_K)
    other = _chunked_product(x, codes, scales.float(), prefill.CHUNK_K)
    err, err_other = ((y - ref).norm() / ref.norm()).item(), ((y - other).norm() / ref.norm()).item()
    assert err < 1e-6 < err_other  # float32 scaling of exact integer sums; another chunking is far off
    assert prefill.W8_CHUNK_K != prefill.CHUNK_K


@needs_kernels
@pytest.mark.parametrize("gemm", OWN_GEMMS)
@pytest.mark.parametrize(("m", "n", "k", "chunk"), [
    (1, 4, 8, 8),          # the smallest: one row, one panel, one 8-code step
    (5, 7, 24, 16),        # a partial row tile, a partial weight panel, a partial last chunk
    (24, 31, 128, 128),    # whole row tiles beside a last panel of 3 outputs (its stores go one by one)
    (16, 33, 896, 1024),   # a whole K in one chunk
    (64, 64, 4864, 1024),  # the 0.5B's down projection at a mixed step's 64 rows: chunks of 1024 and 768
    (70, 13, 200, 64),     # row tiles 4 + 4 + 1 (the last pass short), 64-code prefetch steps with a tail
    (520, 12, 4864, 512),  # more rows than one pass keeps in L2 (two passes)
])
def test_own_gemms_give_the_bytes_of_int_mm(gemm, m, n, k, chunk):
    """pf_w8_gemm's exact integer sums, their weight-sum correction and its float finish (the order of
    pf_scale_rows) give what _int_mm + pf_scale_rows give, bit for bit, with and without bias, into a residual or
    not, with int8's one channel scale or int4's per chunk: the engines are interchangeable. So do pf_w8_gemm_avx2's
    (|w| . sign(x, w): a code of -128 is |w| = 128, still within vpmaddubsw's int16 pairs)."""
    torch.manual_seed(m * 1000 + n)
    nc = -(-k // chunk)
    x = torch.randn(m, k) * torch.linspace(0.1, 4, k)
    x[0, 0] = 60.0  # one outlier: its chunk's scale differs from the others'
    if m > 3:
        x[3] = 0.0  # an all-zero row: scale 0
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    codes[0] = -128  # the extremes: the correction 128 * sum(w) at its largest
    codes[-1] = 127
    for ws in (torch.rand(n) + 0.1, torch.rand(nc, n) + 0.1):
        for bias in (None, torch.randn(n)):
            for resid in (None, torch.randn(m, n)):
                ref = prefill._int8mm(x, codes, ws, bias, None if resid is None else resid.clone(), chunk, "int8mm")
                got = prefill._int8mm(x, codes, ws, bias, None if resid is None else resid.clone(), chunk, gemm)
                assert torch.equal(got, ref), (tuple(ws.shape), bias is None, resid is None)


@needs_kernels
@needs_vnni512
@pytest.mark.parametrize(("m", "n", "k", "chunk", "block"), [
    (64, 37, 896, 1024, 128),   # the 0.5B's K = 896 in one chunk (7 blocks), a last panel of 1 output
    (20, 8, 4864, 1024, 128),   # down: chunks of 8 blocks and a last one of 6
    (9, 5, 160, 64, 32),        # blocks of 32 (a K the 128-blocks do not divide), a partial last chunk
])
def test_vnni_gemm_takes_the_code_sums_kept_with_the_weights(m, n, k, chunk, block):
    """Given the decode kernels' block sums of the weight codes (ckernels.w8_block_sums), pf_w8_gemm adds up each
    chunk's from them instead of summing the codes: the same bytes, and they are read (wrong sums give other
    outputs); sums of the wrong shape are refused, and a block that does not divide the chunk is left unused."""
    from model_runtime import ckernels

    torch.manual_seed(m + n + k)
    x = torch.randn(m, k)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    ws, bias = torch.rand(n) + 0.1, torch.randn(n)
    sums = ckernels.w8_block_sums(codes, block)
    want = prefill._int8mm(x, codes, ws, bias, None, chunk, "int8vnni")
    assert torch.equal(prefill._int8mm(x, codes, ws, bias, None, chunk, "int8vnni", code_sums=(sums, block)), want)
    wrong = prefill._int8mm(x, codes, ws, bias, None, chunk, "int8vnni", code_sums=(sums + 1, block))
    assert not torch.equal(wrong, want)
    with pytest.raises(ValueError, match="code sums"):
        prefill._int8mm(x, codes, ws, bias, None, chunk, "int8vnni", code_sums=(sums[:, 1:], block))
    assert chunk % k  # (every case:) one block of the whole row does not divide the chunk: summed by the kernel
    assert torch.equal(prefill._int8mm(x, codes, ws, bias, None, chunk, "int8vnni",
                                       code_sums=(ckernels.w8_block_sums(codes, k), k)), want)


@needs_kernels
@pytest.mark.parametrize("gemm", ["int8vnni", "int8avx2"])
def test_own_gemms_fall_back_to_int_mm_where_their_code_cannot_run(gemm, monkeypatch):
    torch.manual_seed(2)
    x, codes, ws = torch.randn(20, 256), torch.randint(-127, 128, (12, 256), dtype=torch.int8), torch.rand(12)
    monkeypatch.setattr(prefill, "_runs_own", lambda g: False)
    monkeypatch.setattr(prefill.load(), "pf_w8_gemm", None)  # a call would fail
    monkeypatch.setattr(prefill.load(), "pf_w8_gemm_avx2", None)
    assert torch.equal(prefill._int8mm(x, codes, ws, None, None, 128, gemm),
                       prefill._int8mm(x, codes, ws, None, None, 128, "int8mm"))


needs_avx2_gemm = pytest.mark.skipif(not prefill.cpu_flags() >= prefill.AVX2_FLAGS,
                                     reason="pf_w4_gemm_avx2 needs AVX2 and FMA, which this CPU lacks")


@needs_kernels
@needs_avx2_gemm
@pytest.mark.parametrize(("m", "n", "k", "group"), [
    (1, 4, 64, 32),        # the smallest: one row, one panel, one group of 32
    (5, 7, 128, 32),       # a partial row tile, a partial weight panel (its stores one by one)
    (24, 31, 896, 128),    # whole row tiles (one register pass of 2 and a lone one), a last panel of 3 outputs
    (16, 64, 4864, 128),   # the 0.5B's down projection at PREFILL_MIN_ROWS rows
    (70, 13, 512, 256),    # row tiles 2 + 2 + ... + 1, groups of 256 (8 int16 sums of 32 values each)
    (9, 5, 192, 64),       # groups of 64
    (520, 12, 4864, 128),  # more rows than one pass keeps in L2 (two passes)
])
def test_int4_avx2_gemm_takes_the_decode_kernels_integer_sums(m, n, k, group):
    """pf_w4_gemm_avx2 quantizes the activations as the decode kernels do (per row and group) and multiplies the
    stored codes: each group's integer sum is theirs, so the outputs agree to float rounding (summation order), with
    and without bias, RMSNorm and a residual; the extreme codes (0 and 15 against |x| = 127) do not wrap in int16."""
    from model_runtime import ckernels

    torch.manual_seed(m * 100 + n)
    x = torch.randn(m, k) * torch.linspace(0.1, 4, k)
    x[0, 0] = 60.0
    if m > 3:
        x[3] = 0.0  # an all-zero row: scale 0
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    packed[0] = 0xFF  # every code 15: the largest int16 pair sums against codes of +-127
    packed[-1] = 0x00
    s = (torch.rand(n, k // group) * 0.02 + 0.001).to(torch.bfloat16)
    z = (torch.randn(n, k // group) * 0.01).to(torch.bfloat16)
    lin = Int4Linear(packed, s, z, None, torch.float32, keep_codes=True, backend="dq")
    args = (lin._packed, lin._dq_scales, lin._dq_zeros)
    norm = (torch.rand(k) + 0.5, 1e-6)
    for bias in (None, torch.randn(n)):
        for nm in (None, norm):
            for resid in (None, torch.randn(m, n)):
                got = prefill.linear_w4("int8avx2", x, *args, group, bias, None if resid is None else resid.clone(),
                                        nm)
                want = ckernels.linear_w4(x, *args, bias, group, norm=None if nm is None else nm[0],
                                          eps=0.0 if nm is None else nm[1],
                                          out=None if resid is None else resid.clone())
                scale = float(want.abs().max())
                assert torch.allclose(got, want, rtol=0, atol=2e-6 * scale), (bias is None, nm is None, resid is None)
    w = kernels.dequantize_int4(kernels.unpack_nibbles(packed), s, z)
    ref = x.double() @ w.double().t()
    got = prefill.linear_w4("int8avx2", x, *args, group, None).double()
    assert (got - ref).norm() / ref.norm() < 0.03  # and near the float product (activations rounded to 8 bits)


@needs_kernels
def test_int8mm_refuses_weight_scales_chunked_otherwise_than_the_activations():
    codes = torch.randint(-127, 128, (8, 1024), dtype=torch.int8)
    with pytest.raises(ValueError, match="2 weight-scale chunks for 4 activation chunks of 256"):
        prefill._int8mm(torch.randn(16, 1024), codes, torch.ones(2, 8), None, None, 256)


@needs_kernels
@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_linears_take_the_prefill_gemm_from_min_rows_on_and_the_dq_kernels_below(cls, monkeypatch):
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.02
    common = {"prefill_kernel": "int8mm", "prefill_min_rows": 16}
    lin: Int8Linear | Int4Linear
    if cls == "int8":
        lin = Int8Linear(*kernels.quantize_int8(w), None, torch.float32, backend="dq", **common)
    else:
        lin = Int4Linear(*kernels.quantize_int4_packed(w, 32), None, torch.float32, backend="dq", **common)
    calls: list[int] = []
    for name in ("linear_w8", "linear_w4"):
        real = getattr(prefill, name)
        monkeypatch.setattr(prefill, name, lambda *a, _r=real, **kw: calls.append(a[1].shape[0]) or _r(*a, **kw))
    lin(torch.randn(15, 128))
    assert calls == []
    lin(torch.randn(16, 128))
    assert calls == [16]
    assert "prefill int8mm >= 16 rows" in repr(lin)


def _greedy_with(model_dir, prefill_kernel: str, monkeypatch, **load) -> tuple[list[int], torch.Tensor]:
    monkeypatch.setenv("DISTILLERY_PREFILL", prefill_kernel)
    loaded = load_model(model_dir, **load)
    assert loaded.plan is not None and loaded.plan.prefill_kernel == (
        prefill_kernel if loaded.plan.backend == "dq" else "none")
    return greedy(loaded.model, LONG_PROMPT, 12)


@needs_kernels
@pytest.mark.parametrize("kernel", [_where_it_runs(k) for k in ("int8mm", "int8vnni", "int8avx2", "bf16")])
def test_int8_prefill_gemm_gives_the_same_greedy_tokens_as_the_dq_kernels(tiny_qwen2_dir, kernel, monkeypatch):
    tokens, logits = _greedy_with(tiny_qwen2_dir, kernel, monkeypatch, quantization="int8")
    tokens_dq, logits_dq = _greedy_with(tiny_qwen2_dir, "none", monkeypatch, quantization="int8")
    assert tokens == tokens_dq
    assert torch.allclose(logits, logits_dq, atol=0.03 * float(logits_dq.abs().max()))


@needs_kernels
@pytest.mark.parametrize("kernel", [_where_it_runs(k) for k in ("int8mm", "int8vnni")])  # (int8avx2: the next test;
def test_int4_prefill_gemm_follows_the_exact_int4_math(tiny_qwen2_dir, kernel, monkeypatch):  # bf16: ..._match_...)
    """int4 on the random tiny model has a near-tie at the 6th token that the dq kernels' own rounding
    (activations quantized per group of 32) tips the other way: the prefill GEMM gives the tokens of
    the exact int4 math (generic backend in float32), and logits close to the dq kernels'."""
    tokens, logits = _greedy_with(tiny_qwen2_dir, kernel, monkeypatch, quantization="int4", group_size=32)
    tokens_exact, logits_exact = _greedy_with(tiny_qwen2_dir, "none", monkeypatch, quantization="int4",
                                              group_size=32, kernels="generic", dtype="float32")
    tokens_dq, logits_dq = _greedy_with(tiny_qwen2_dir, "none", monkeypatch, quantization="int4", group_size=32)
    assert tokens == tokens_exact
    assert tokens[:5] == tokens_dq[:5]
    scale = float(logits_exact.abs().max())
    assert torch.allclose(logits, logits_exact, atol=0.04 * scale)
    assert torch.allclose(logits, logits_dq, atol=0.04 * scale)


@needs_kernels
@needs_avx2_gemm
def test_int4_avx2_prefill_gives_the_dq_kernels_tokens(tiny_qwen2_dir, monkeypatch):
    """int4 weights on the AVX2 GEMM (their own codes, the activations quantized as the decode kernels quantize
    them): the decode kernels' greedy tokens, the near tie that the exact int4 math tips the other way included
    (test_int4_prefill_gemm_follows_the_exact_int4_math), and logits close to theirs. Each linear agrees with
    theirs to float rounding (test_int4_avx2_gemm_takes_the_decode_kernels_integer_sums); through the model a
    value on a rounding boundary can take the next code when the next linear quantizes it, hence 1% here."""
    tokens, logits = _greedy_with(tiny_qwen2_dir, "int8avx2", monkeypatch, quantization="int4", group_size=32)
    tokens_dq, logits_dq = _greedy_with(tiny_qwen2_dir, "none", monkeypatch, quantization="int4", group_size=32)
    tokens_exact, _ = _greedy_with(tiny_qwen2_dir, "none", monkeypatch, quantization="int4", group_size=32,
                                   kernels="generic", dtype="float32")
    assert tokens == tokens_dq != tokens_exact
    assert torch.allclose(logits, logits_dq, atol=0.02 * float(logits_dq.abs().max()))


@needs_kernels
def test_build_command_prints_the_library(capsys):
    assert prefill.main(["build"]) == 0
    assert capsys.readouterr().out.strip().endswith(".so")
    assert prefill.main(["nonsense"]) == 2


def test_scratch_views_are_reused_per_shape_and_dropped_when_their_buffer_grows(monkeypatch) -> None:
    """_Scratch hands out the same view for the same (name, shape, dtype) (a forward asks for a few shapes layer
    after layer); a request that outgrows a buffer gets a new one, and no later request of a smaller shape gets a view
    of the old (freed) buffer; the kept views stay few."""
    scratch = prefill._Scratch()
    a = scratch.get("xq", (4, 8), torch.int8)
    assert scratch.get("xq", (4, 8), torch.int8) is a
    b = scratch.get("xq", (2, 8), torch.int8)
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
    big = scratch.get("xq", (64, 64), torch.int8)  # outgrows the 32-byte buffer
    assert big.shape == (64, 64) and big.dtype == torch.int8
    again = scratch.get("xq", (4, 8), torch.int8)
    assert again is not a and again.data_ptr() == big.data_ptr()
    f = scratch.get("xs", (4, 2), torch.float32)
    assert f.dtype == torch.float32 and f.shape == (4, 2) and f.data_ptr() != big.data_ptr()
    monkeypatch.setattr(prefill, "SCRATCH_VIEWS", 3)
    for m in range(1, 10):
        assert scratch.get("xq", (m, 8), torch.int8).shape == (m, 8)
        assert len(scratch.views) <= 3
