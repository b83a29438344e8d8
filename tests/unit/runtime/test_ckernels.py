"""ckernels.py + csrc/dq_kernels.c: the AVX2 int8/int4 linear and decode-attention kernels.

Each kernel is checked against a float reference built from the same stored weights: the only
difference allowed is the int8 quantization of the activations (per block, ~0.6% relative). The
fused forms (RMSNorm in, residual out) equal their unfused compositions, every batch size gives
each row the same result as running it alone (a batch must not change anyone's tokens), and the
fused decode step of a whole model matches the plain PyTorch path.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from model_runtime import ckernels
from model_runtime.kernels import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8
from model_runtime.loader import load_model
from tests.cpu_kernels import needs_cpu_kernels

pytestmark = needs_cpu_kernels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


_ISA_FLAGS = {"avx2": {"avx2"}, "avxvnni": {"avx_vnni"},  # /proc/cpuinfo's names
              "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}}


def _cpu_has(isa: str) -> bool:
    return _ISA_FLAGS[isa] <= ckernels._cpu_flags()


@pytest.fixture(scope="module", params=["avx2", "avxvnni", "avx512vnni"])
def lib(request):
    """The library with its linear kernels on each instruction set this CPU has (every kernel test runs
    on each); on a machine with a C compiler and AVX2 they must build: no silent fallback in tests."""
    if not _cpu_has(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    with ckernels._load().using_isa(request.param) as loaded:
        assert loaded.isa == request.param
        yield loaded


def test_a_forced_instruction_set_that_cannot_run_is_a_loud_error(monkeypatch):
    """DISTILLERY_CPU_ISA is a setting: a wrong or unavailable one stops the load (no quiet fallback to
    PyTorch's kernels, which `auto` backend selection would otherwise do)."""
    path = ckernels.build()
    lib = ckernels._load()
    with lib.using_isa(lib.isa):  # the same library (dlopen shares it): put its process-wide choice back
        monkeypatch.setenv("DISTILLERY_CPU_ISA", "avx1024")
        with pytest.raises(ValueError, match="expected one of"):
            ckernels._Lib(path)
        monkeypatch.setenv("DISTILLERY_CPU_ISA", "avxvnni")
        if _cpu_has("avxvnni"):
            assert ckernels._Lib(path).isa == "avxvnni"
        else:
            with pytest.raises(ValueError, match="does not have it"):
                ckernels._Lib(path)
        monkeypatch.setenv("DISTILLERY_CPU_ISA", "avx2")
        assert ckernels._Lib(path).isa == "avx2"


@pytest.fixture(scope="module")
def int8_weights():
    torch.manual_seed(0)
    w = torch.randn(200, 256) * 0.05
    codes, scales = quantize_int8(w)
    return codes, scales, codes.float() * scales.float()[:, None]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_int8_linear_matches_the_dequantized_weights_and_is_batch_invariant(lib, int8_weights, m):
    codes, scales, wd = int8_weights
    x = torch.randn(m, 256)
    bias = torch.randn(200)
    y = ckernels.linear_w8(x, codes, scales.float(), bias, 128)
    ref = x @ wd.T + bias
    assert y.shape == (m, 200) and y.dtype == torch.float32
    assert rel_err(y, ref) < 0.015  # activation quantization only
    for i in range(m):  # each row exactly as if it ran alone
        assert torch.equal(y[i:i + 1], ckernels.linear_w8(x[i:i + 1].contiguous(), codes, scales.float(), bias, 128))


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 4, 6])
def test_int4_linear_matches_the_dequantized_weights_and_is_batch_invariant(lib, group, m):
    torch.manual_seed(group + m)
    w = torch.randn(96, 256) * 0.05 + 0.01  # an offset: the zero points matter
    codes, s, z = quantize_int4(w, group)
    packed = ckernels.pack_w4(codes)
    x = torch.randn(m, 256)
    y = ckernels.linear_w4(x, packed, s, z, None, group)
    ref = x @ dequantize_int4(codes, s, z).T
    assert rel_err(y, ref) < 0.015
    for i in range(m):
        assert torch.equal(y[i:i + 1], ckernels.linear_w4(x[i:i + 1].contiguous(), packed, s, z, None, group))


@pytest.mark.skipif(not _cpu_has("avxvnni"), reason="this CPU lacks AVX-VNNI")
@pytest.mark.parametrize("m", [1, 3, 8])
def test_avx2_and_avxvnni_kernels_give_identical_results(int8_weights, m):
    """Both sum the same integer products exactly (no int16 saturation on AVX2: |w| |x| pairs stay below
    2^15), then apply the same float scales: bit-identical outputs, so the CPU never changes a token."""
    loaded = ckernels._load()
    codes, scales, _ = int8_weights
    torch.manual_seed(m)
    x, norm = torch.randn(m, 256), torch.rand(256) + 0.5
    w4 = torch.randn(96, 256) * 0.05 + 0.01
    int4 = {g: (ckernels.pack_w4(c), s, z) for g in (32, 64, 128) for c, s, z in [quantize_int4(w4, g)]}
    outs = {}
    for isa in ("avx2", "avxvnni"):
        with loaded.using_isa(isa):  # the module's `lib` fixture may have chosen one: it gets it back
            outs[isa] = [ckernels.linear_w8(x, codes, scales.float(), None, 128, norm=norm, eps=1e-6)]
            outs[isa] += [ckernels.linear_w4(x, pk, s, z, None, g) for g, (pk, s, z) in int4.items()]
    for a, b in zip(outs["avx2"], outs["avxvnni"], strict=True):
        assert torch.equal(a, b)


def test_one_row_kernels_are_set_per_weight_width_and_cleared_inside_an_explicit_choice() -> None:
    """dq_set_row_isa: one-row calls of 8- or 4-bit weights go to the row setting (dq_call_isa says where a call
    runs), calls of more rows stay on the chosen set; using_isa clears both settings inside its block (a comparison
    of instruction sets gets that set only) and puts them back after it; widths and names outside the table are
    refused. (The module's `lib` fixture may hold a using_isa block open: the state is set here and put back.)"""
    loaded = ckernels._load()
    before = {bits: loaded.set_row_isa(bits, "") for bits in (8, 4)}
    try:
        chosen = loaded.isa
        assert loaded.call_isa(8, 1) == loaded.call_isa(4, 1) == chosen  # "": the chosen set's
        assert loaded.set_row_isa(8, "avx2") == ""
        assert (loaded.row_isa(8), loaded.row_isa(4)) == ("avx2", "")
        assert (loaded.call_isa(8, 1), loaded.call_isa(8, 2), loaded.call_isa(4, 1)) == ("avx2", chosen, chosen)
        loaded.set_row_isa(4, "avx2")
        with loaded.using_isa("avx2"):
            assert (loaded.row_isa(8), loaded.row_isa(4)) == ("", "")
        assert (loaded.row_isa(8), loaded.row_isa(4)) == ("avx2", "avx2")
        with pytest.raises(ValueError):
            loaded.set_row_isa(16, "avx2")
        with pytest.raises(ValueError):
            loaded.set_row_isa(8, "sse4")
        if not _cpu_has("avx512vnni"):
            with pytest.raises(ckernels.KernelUnavailable):
                loaded.set_row_isa(8, "avx512vnni")
    finally:
        for bits, row in before.items():
            loaded.set_row_isa(bits, row)


def test_a_forced_or_compared_instruction_set_is_pinned(monkeypatch) -> None:
    """DISTILLERY_CPU_ISA naming a set, or a using_isa block, pins every call to that set (the kernel plan then
    reroutes no row: plan.row_isas); auto outside a block does not. (New handles on the process-wide library set
    its instruction set: the outer block puts the one in use back.)"""
    with ckernels._load().using_isa("avx2"):
        monkeypatch.setenv("DISTILLERY_CPU_ISA", "avx2")
        assert ckernels._Lib(ckernels.build()).pinned
        monkeypatch.setenv("DISTILLERY_CPU_ISA", "auto")
        loaded = ckernels._Lib(ckernels.build())
        assert not loaded.pinned
        with loaded.using_isa("avx2"):
            assert loaded.pinned
            with loaded.using_isa("avx2"):
                assert loaded.pinned
            assert loaded.pinned
        assert not loaded.pinned


def test_available_instruction_sets_follow_the_cpu_flags() -> None:
    """auto picks the best the CPU has; each one it lists can be selected (AVX2 always, on this test's
    machines), so every ISA-specific test below really runs where the flags say it can."""
    loaded = ckernels._load()
    usable = loaded.available_isas()
    assert usable == [isa for isa in ("avx512vnni", "avxvnni", "avx2") if _cpu_has(isa)]
    with loaded.using_isa("avx2"):
        assert ckernels._Lib(ckernels.build()).isa == usable[0]  # DISTILLERY_CPU_ISA unset: auto, the best


# (N, K, int4 group or None for int8): odd N (two weight rows per pass on AVX-512 leave one over), K a
# multiple of 128 (the 512-bit kernels) and not (K 192: int4 on 256-bit EVEX kernels; K 160: int8 blocks
# of 32), every int4 group size the kernel takes, and a K with several groups of 256
_ISA_SHAPES = [(37, 256, None), (37, 192, None), (37, 160, None), (37, 896, None),
               (37, 256, 32), (37, 256, 64), (37, 256, 128), (37, 512, 256), (37, 192, 64), (37, 192, 32)]


def _isa_case(n: int, k: int, group: int | None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """run(x, **kw): the linear of a random (n, k) weight, int8 or int4 with `group`, plus a bias; the float weight
    it quantized, an RMSNorm weight and that bias"""
    torch.manual_seed(n + k + (group or 0))
    w = torch.randn(n, k) * 0.05 + 0.01
    norm, bias = torch.rand(k) + 0.5, torch.randn(n)
    if group is None:
        codes, scales = quantize_int8(w)
        wd = codes.float() * scales.float()[:, None]
        block = ckernels.act_block(k)

        def run(x: torch.Tensor, **kw: Any) -> torch.Tensor:
            return ckernels.linear_w8(x, codes, scales.float(), bias, block, **kw)
    else:
        c4, s4, z4 = quantize_int4(w, group)
        packed = ckernels.pack_w4(c4)
        wd = dequantize_int4(c4, s4, z4)

        def run(x: torch.Tensor, **kw: Any) -> torch.Tensor:
            return ckernels.linear_w4(x, packed, s4, z4, bias, group, **kw)
    return run, wd, norm, bias


@pytest.mark.parametrize(("n", "k", "group"), _ISA_SHAPES)
def test_every_instruction_set_gives_the_avx2_results_bit_for_bit(n: int, k: int, group: int | None) -> None:
    """Every instruction set sums the same integer products exactly and applies the same float steps in
    the same order: the AVX2 outputs bit for bit, at every batch size 1..8, with the fused RMSNorm, a
    bias and the residual add, so the CPU a replica lands on never changes a token. Each also matches a
    float reference (activation quantization only)."""
    loaded = ckernels._load()
    isas = loaded.available_isas()
    run, wd, norm, bias = _isa_case(n, k, group)
    for m in range(1, 9):
        x = torch.randn(m, k) * 2
        residual = torch.randn(m, n)
        outs = {}
        for isa in isas:
            with loaded.using_isa(isa):
                out = residual.clone()
                outs[isa] = (run(x), run(x, norm=norm, eps=1e-6, out=out))
        for isa in isas:
            for got, want in zip(outs[isa], outs["avx2"], strict=True):
                assert torch.equal(got, want), (isa, m)
        assert rel_err(outs[isas[0]][0], x @ wd.T + bias) < 0.015
        normed = F.rms_norm(x, (k,), norm, 1e-6)
        assert rel_err(outs[isas[0]][1] - residual, normed @ wd.T + bias) < 0.015


@pytest.mark.parametrize(("k", "group"), [(896, None), (896, 128), (512, 256)])
@pytest.mark.parametrize("n", [37, 40])
@pytest.mark.parametrize("m", [9, 16, 17, 26])
def test_batches_past_one_row_tile_give_the_avx2_results_and_each_row_its_own(m: int, n: int, k: int,
                                                                              group: int | None) -> None:
    """Batches of more than 8 rows (a prompt chunk on the dq kernels) take the AVX-512 batch kernels in tiles of 8
    rows (int8: two at a time, an odd last tile beside a padding one; int4: one after another over a panel of weight
    rows; a short last tile, weight rows past the last full panel included): every set gives the AVX2 bytes, and
    every row its one-row result."""
    loaded = ckernels._load()
    run, wd, norm, bias = _isa_case(n, k, group)
    x, residual = torch.randn(m, k) * 2, torch.randn(m, n)
    outs = {}
    for isa in loaded.available_isas():
        with loaded.using_isa(isa):
            outs[isa] = (run(x), run(x, norm=norm, eps=1e-6, out=residual.clone()))
    for isa, got in outs.items():
        for a, b in zip(got, outs["avx2"], strict=True):
            assert torch.equal(a, b), isa
    assert rel_err(outs["avx2"][0], x @ wd.T + bias) < 0.015
    for i in (0, 7, 8, m - 1):
        assert torch.equal(outs["avx2"][0][i:i + 1], run(x[i:i + 1].contiguous()))


def test_int8_block_sums_prepared_with_the_weights_are_what_the_batch_kernel_reads(lib) -> None:
    """w8_block_sums is each activation block's weight sum; given or not, the kernels give the same bytes at
    every batch size, and on AVX-512 every call really reads the given sums (wrong ones change its result), one row
    on the 512-bit kernels included."""
    torch.manual_seed(3)
    codes, scales = quantize_int8(torch.randn(37, 896) * 0.05 + 0.01)
    sums = ckernels.w8_block_sums(codes, 128)
    assert sums.dtype == torch.int32 and torch.equal(sums, codes.view(37, 7, 128).sum(-1, dtype=torch.int32))
    for m in (1, 2, 3, 4, 8, 9):
        x = torch.randn(m, 896)
        want = ckernels.linear_w8(x, codes, scales.float(), None, 128)
        assert torch.equal(ckernels.linear_w8(x, codes, scales.float(), None, 128, wsum=sums), want)
        wrong = ckernels.linear_w8(x, codes, scales.float(), None, 128, wsum=sums + 1)
        assert torch.equal(wrong, want) == (lib.isa != "avx512vnni"), m
    with pytest.raises(ValueError, match="wsum must be"):
        ckernels.linear_w8(torch.randn(2, 896), codes, scales.float(), None, 128, wsum=sums[:, :-1])
    with pytest.raises(ValueError, match="does not divide"):
        ckernels.w8_block_sums(codes, 96)


@pytest.mark.parametrize(("n", "k", "group"), _ISA_SHAPES)
def test_one_row_kernels_give_the_avx2_results_bit_for_bit(n: int, k: int, group: int | None) -> None:
    """One activation row may take other kernels than the chosen set's (the kernel plan's row_isas): every row
    setting this CPU can run (vnni256 included: on an AVX512-VNNI CPU without AVX-VNNI, the EVEX-encoded 256-bit
    kernels, reachable no other way) runs there and gives the AVX2 bytes, with the fused RMSNorm and the residual
    add; two rows stay on the chosen set."""
    loaded = ckernels._load()
    run, _, norm, _ = _isa_case(n, k, group)
    x, residual = torch.randn(1, k) * 2, torch.randn(1, n)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return run(x), run(x, norm=norm, eps=1e-6, out=residual.clone())

    with loaded.using_isa("avx2"):
        want = both()
    bits = 8 if group is None else 4
    before = loaded.set_row_isa(bits, "")
    ran = []
    try:
        for row in ("avx2", "vnni256", "avx512vnni"):
            try:
                loaded.set_row_isa(bits, row)
            except ckernels.KernelUnavailable:
                continue
            assert loaded.call_isa(bits, 1) == ("avxvnni" if row == "vnni256" else row)
            assert loaded.call_isa(bits, 2) == loaded.isa
            for got, w in zip(both(), want, strict=True):
                assert torch.equal(got, w), row
            ran.append(row)
    finally:
        loaded.set_row_isa(bits, before)
    assert ran[0] == "avx2"
    if {"avx512vnni", "avxvnni"} & set(loaded.available_isas()):  # what this CPU and this build of the library run
        assert "vnni256" in ran


def test_pack_w4_layout_is_low_nibbles_then_high_per_block_of_64(lib):
    codes = torch.randint(0, 16, (2, 128), dtype=torch.uint8)
    packed = ckernels.pack_w4(codes)
    assert packed.shape == (2, 64)
    for n in range(2):
        for b in (0, 64):
            for j in range(32):
                assert int(packed[n, b // 2 + j]) == (int(codes[n, b + j]) | int(codes[n, b + j + 32]) << 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        ckernels.pack_w4(torch.zeros(2, 96, dtype=torch.uint8))


def test_fused_rmsnorm_and_residual_equal_their_composition(lib, int8_weights):
    codes, scales, _ = int8_weights
    x = torch.randn(3, 256) * 3
    norm_w = torch.rand(256) + 0.5
    normed = F.rms_norm(x, (256,), norm_w, 1e-6)
    plain = ckernels.linear_w8(normed.contiguous(), codes, scales.float(), None, 128)
    fused = ckernels.linear_w8(x, codes, scales.float(), None, 128, norm=norm_w, eps=1e-6)
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-4)
    residual = torch.randn(3, 200)
    out = residual.clone()
    returned = ckernels.linear_w8(x, codes, scales.float(), None, 128, norm=norm_w, eps=1e-6, out=out)
    assert returned is out and torch.allclose(out, residual + fused, atol=1e-5)


def test_bad_arguments_are_refused(lib, int8_weights):
    """The C side trusts raw pointers: every shape, dtype and block size is checked before a call."""
    codes, scales, _ = int8_weights
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="float32"):
        ckernels.linear_w8(x.to(torch.bfloat16), codes, scales.float(), None, 128)
    for block in (96, 0):  # not a multiple of 32 / zero (a division by zero in C, were it passed through)
        with pytest.raises(RuntimeError, match="failed"):
            ckernels.linear_w8(x, codes, scales.float(), None, block)
    with pytest.raises(ValueError, match="out must be"):
        ckernels.linear_w8(x, codes, scales.float(), None, 128, out=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="scales must be"):
        ckernels.linear_w8(x, codes, scales, None, 128)  # bfloat16 scales where float32 is read
    with pytest.raises(ValueError, match="w must be"):
        ckernels.linear_w8(x, codes.t(), scales.float(), None, 128)
    c4, s4, z4 = quantize_int4(torch.randn(64, 192), 64)
    packed = ckernels.pack_w4(c4)
    with pytest.raises(ValueError, match="group"):
        ckernels.linear_w4(torch.randn(1, 192), packed, s4, z4, None, 0)
    with pytest.raises(ValueError, match="zeros must be"):
        ckernels.linear_w4(torch.randn(1, 192), packed, s4, z4.float(), None, 64)


def test_no_rows_give_an_empty_result(lib, int8_weights):
    """Zero activation rows compute nothing (the batch kernels would otherwise read a row that is not there)."""
    codes, scales, _ = int8_weights
    y = ckernels.linear_w8(torch.empty(0, 256), codes, scales.float(), None, 128,
                           wsum=ckernels.w8_block_sums(codes, 128))
    assert y.shape == (0, 200)
    c4, s4, z4 = quantize_int4(torch.randn(64, 256), 64)
    assert ckernels.linear_w4(torch.empty(0, 256), ckernels.pack_w4(c4), s4, z4, None, 64).shape == (0, 64)


def test_int4_groups_that_split_a_64_value_block_are_not_given_to_the_kernel(lib):
    """A group of 96 (possible in a foreign artifact) would straddle the kernel's 64-value blocks."""
    assert ckernels.w4_group_supported(32, 192) and ckernels.w4_group_supported(128, 256)
    assert not ckernels.w4_group_supported(96, 192) and not ckernels.w4_group_supported(0, 192)
    c4, s4, z4 = quantize_int4(torch.randn(64, 192), 96)
    with pytest.raises(RuntimeError, match="failed"):
        ckernels.linear_w4(torch.randn(1, 192), ckernels.pack_w4(c4), s4, z4, None, 96)
    from model_runtime.kernels import pack_nibbles

    layer = Int4Linear(pack_nibbles(c4), s4, z4, None, torch.bfloat16)
    assert layer.group_size == 96 and layer.backend == "generic" and layer._packed is None  # dequantize-in-matmul
    x = torch.randn(3, 192)
    ref = x @ dequantize_int4(c4, s4, z4).T
    assert rel_err(layer(x.to(torch.bfloat16)).float(), ref) < 0.02


def _torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _reference_attention(qkv, nh, nkv, hd, slots, positions, cos, sin, kc_ref, vc_ref) -> list[torch.Tensor]:
    """What attn_decode should give, in PyTorch: every row's RoPE'd key and value written into kc_ref / vc_ref first
    (rows of one slot see the earlier ones), then each row's [nh, hd] grouped-query attention up to its position."""
    for b in range(len(slots)):
        s, p = int(slots[b]), int(positions[b])
        kc_ref[s, :, p] = _torch_rope(qkv[b, nh * hd:(nh + nkv) * hd].view(nkv, hd), cos[p], sin[p])
        vc_ref[s, :, p] = qkv[b, (nh + nkv) * hd:].view(nkv, hd)
    outs = []
    for b in range(len(slots)):
        s, p = int(slots[b]), int(positions[b])
        q = _torch_rope(qkv[b, : nh * hd].view(nh, hd), cos[p], sin[p])
        keys = kc_ref[s, :, : p + 1].repeat_interleave(nh // nkv, dim=0)       # [nh, L, hd]
        vals = vc_ref[s, :, : p + 1].repeat_interleave(nh // nkv, dim=0)
        att = torch.softmax(q[:, None, :] @ keys.transpose(1, 2) / math.sqrt(hd), dim=-1)  # [nh, 1, L]
        outs.append((att @ vals)[:, 0])
    return outs


# head sizes that take each of the kernel's column paths (64, 32, 8 at a time, one at a time) and its scores' tail
# past the last 8 columns: 32, 64, 100 = 64 + 32 + 4, 136 = 2 x 64 + 8
@pytest.mark.parametrize("hd", [32, 64, 100, 136])
def test_attn_decode_matches_rope_cache_write_and_grouped_query_attention(lib, hd):
    torch.manual_seed(1)
    nh, nkv, max_batch, max_len = 6, 2, 4, 40
    kc = torch.randn(max_batch, nkv, max_len, hd)
    vc = torch.randn(max_batch, nkv, max_len, hd)
    t = torch.arange(max_len, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    slots, positions = torch.tensor([2, 0, 3]), torch.tensor([5, 17, 0])
    qkv = torch.randn(3, (nh + 2 * nkv) * hd)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = ckernels.attn_decode(qkv, nh, nkv, hd, slots, positions, cos, sin, kc, vc)
    assert out.shape == (3, nh * hd)
    for b in range(3):  # each row alone gives the bytes it got in the batch (rows of different lengths share threads)
        alone = ckernels.attn_decode(qkv[b:b + 1].contiguous(), nh, nkv, hd, slots[b:b + 1], positions[b:b + 1], cos,
                                     sin, kc_ref.clone(), vc_ref.clone())
        assert torch.equal(alone[0], out[b]), b
    ref = _reference_attention(qkv, nh, nkv, hd, slots, positions, cos, sin, kc_ref, vc_ref)
    for b in range(3):
        assert torch.allclose(out[b].view(nh, hd), ref[b], atol=1e-5), b
    assert torch.allclose(kc, kc_ref, atol=1e-6) and torch.equal(vc, vc_ref)  # written where expected, nothing else
    with pytest.raises(ValueError, match="outside"):
        ckernels.attn_decode(qkv, nh, nkv, hd, slots, torch.tensor([5, 17, max_len]), cos, sin, kc, vc)
    with pytest.raises(ValueError, match="slot is outside"):
        ckernels.attn_decode(qkv, nh, nkv, hd, torch.tensor([2, 0, max_batch]), positions, cos, sin, kc, vc)
    with pytest.raises(ValueError, match="slot is outside"):
        ckernels.attn_decode(qkv, nh, nkv, hd, torch.tensor([2, -1, 3]), positions, cos, sin, kc, vc)
    with pytest.raises(ValueError, match="shapes"):
        ckernels.attn_decode(qkv, nh, nkv + 1, hd, slots, positions, cos, sin, kc, vc)
    odd = hd - 1  # RoPE rotates the two halves of a head: an odd size would leave one value unset
    with pytest.raises(ValueError, match="must be even"):
        ckernels.attn_decode(torch.randn(3, (nh + 2 * nkv) * odd), nh, nkv, odd, slots, positions,
                             cos[:, :odd].contiguous(), sin[:, :odd].contiguous(), kc[..., :odd].contiguous(),
                             vc[..., :odd].contiguous())


# 14/2 heads: a tile holds two rows' 7 query heads; 32/1: one row's heads take two tiles (16 a tile)
@pytest.mark.parametrize(("nh", "nkv"), [(14, 2), (32, 1)])
def test_attn_decode_rows_sharing_a_slot_attend_causally(lib, nh, nkv):
    """A prompt chunk's rows ride a decode step as rows of one slot (consecutive positions): the kernel runs them in
    tiles that read the slot's keys/values once a block. Each row attends only up to its own position (the chunk's
    later rows, and stale NaN keys past the chunk, never reach it), and each row alone gives the bytes it got in the
    batch (the tiles it shared do not change it)."""
    torch.manual_seed(2)
    hd, max_batch, max_len = 64, 3, 200
    kc = torch.randn(max_batch, nkv, max_len, hd)
    vc = torch.randn(max_batch, nkv, max_len, hd)
    kc[1, :, 150:] = float("nan")  # stale keys/values past the chunk
    vc[1, :, 150:] = float("nan")
    t = torch.arange(max_len, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    # a decode row of slot 0, a 9-row chunk of slot 1 at 141..149 (blocks of 64 positions: its rows span three), a
    # decode row of slot 2
    slots = torch.tensor([0, *[1] * 9, 2])
    positions = torch.tensor([70, *range(141, 150), 3])
    n = len(slots)
    qkv = torch.randn(n, (nh + 2 * nkv) * hd)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = ckernels.attn_decode(qkv, nh, nkv, hd, slots, positions, cos, sin, kc, vc)
    assert not out.isnan().any()
    ref = _reference_attention(qkv, nh, nkv, hd, slots, positions, cos, sin, kc_ref, vc_ref)
    for b in range(n):
        assert torch.allclose(out[b].view(nh, hd), ref[b], atol=1e-5), b
        # alone, over the cache the batch left (the chunk's earlier rows written): the same bytes
        alone = ckernels.attn_decode(qkv[b:b + 1].contiguous(), nh, nkv, hd, slots[b:b + 1], positions[b:b + 1], cos,
                                     sin, kc.clone(), vc.clone())
        assert torch.equal(alone[0], out[b]), b


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_fused_decode_matches_the_pytorch_path(tiny_qwen2_dir, method):
    """The whole model: a decode step through Block.decode_fused equals the unfused forward."""
    loaded = load_model(tiny_qwen2_dir, quantization=method, group_size=32)
    model = loaded.model
    assert model.fused_decode and model.act_dtype == torch.float32
    assert all(getattr(m, "backend", "dq") == "dq" for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    prompt = torch.tensor([[151646, 100, 200, 300, 400, 500]])
    with torch.inference_mode():
        caches = [model.new_cache(2, 64) for _ in range(2)]
        for cache in caches:
            model(prompt, torch.arange(6)[None], cache, slice(0, 1), logits="none")
        ids, pos = torch.tensor([[7]]), torch.tensor([[6]])
        fused = model(ids, pos, caches[0], slice(0, 1))
        model.fused_decode = False
        try:
            plain = model(ids, pos, caches[1], slice(0, 1))
        finally:
            model.fused_decode = True
    assert torch.allclose(fused, plain, atol=1e-3, rtol=1e-3)
    assert torch.allclose(caches[0].k[0][:, :, :7], caches[1].k[0][:, :, :7], atol=1e-4)


def test_aten_backend_can_be_forced(tiny_qwen2_dir, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CPU_KERNELS", "aten")
    loaded = load_model(tiny_qwen2_dir, quantization="int8")
    model = loaded.model
    assert loaded.plan is not None and (loaded.plan.backend, loaded.plan.lm_head_backend) == ("aten", "aten")
    assert not model.fused_decode and model.act_dtype == torch.bfloat16  # the plan's float dtype
    assert {m.backend for m in model.modules() if isinstance(m, Int8Linear)} == {"aten"}
    monkeypatch.setenv("DISTILLERY_CPU_KERNELS", "bogus")
    with pytest.raises(ValueError, match="DISTILLERY_CPU_KERNELS"):
        ckernels.backend()


def test_build_command_prints_the_library(lib, capsys):
    assert ckernels.main(["build"]) == 0
    assert capsys.readouterr().out.strip().endswith(".so")
    assert ckernels.main(["nonsense"]) == 2


# ---------------------------------------------------------------- a step's rows of logits (dq_sample_rows)
@needs_cpu_kernels
@pytest.mark.parametrize("vocab", [5, 37, 1003, 4096 + 131])
def test_sample_rows_max_and_argmax_are_torchs_first_index_and_poison_shows(vocab):
    torch.manual_seed(vocab)
    rows = torch.randn(6, vocab) * 3
    rows[1, vocab // 3] = rows[1, vocab - 1] = rows[1].max() + 1  # a tie: the first index, as torch.argmax
    rows[2, vocab // 2] = float("nan")                              # NaN anywhere: the max is NaN
    rows[3, -1] = float("inf")
    rows[4, : vocab - 1] = float("-inf")                           # only the last value can be the max
    rows[5] = float("-inf")
    maxv, argmax, choice = ckernels.sample_rows(rows, torch.zeros(6), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(argmax[[0, 1, 3, 4]], rows[[0, 1, 3, 4]].argmax(dim=-1))
    assert torch.equal(maxv[[0, 1, 3, 4, 5]], rows[[0, 1, 3, 4, 5]].amax(dim=-1))
    assert maxv[2].isnan() and torch.isfinite(maxv).tolist() == [True, True, False, False, True, False]
    assert choice.tolist() == [-1] * 6  # temperature 0: nothing drawn


@needs_cpu_kernels
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-5])
@pytest.mark.parametrize("vocab", [37, 1003, 20000])
def test_sample_rows_draws_what_sample_draws_from_the_same_number(temperature, vocab):
    """_sample's draw (softmax, then _draw) at the uniform number its generator gives, for 200 seeds: the C draw's
    probabilities are its own (exp_ps), so only a number within rounding of a boundary could choose differently."""
    from model_runtime.sampling import _sample

    torch.manual_seed(vocab)
    row = torch.randn(vocab) * 1.5
    row[::7] = float("-inf")  # masked tokens: probability 0, never drawn
    seeds = range(200)
    us = torch.tensor([float(torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64))
                       for s in seeds], dtype=torch.float64)
    rows = row.expand(len(seeds), vocab).contiguous()
    _, _, choice = ckernels.sample_rows(rows, torch.full((len(seeds),), temperature), us)
    expected = [_sample(row, temperature, 1.0, torch.Generator().manual_seed(s)) for s in seeds]
    assert choice.tolist() == expected
    assert all(c % 7 for c in choice.tolist())
    assert len(set(expected)) >= (1 if temperature < 0.01 else 4)  # (the seeds do spread the draws)


@needs_cpu_kernels
def test_sample_rows_never_draws_a_token_of_probability_zero_at_the_edges():
    """u at 0 and just below 1 over a row whose first and last blocks are masked: the draw lands on a possible token
    (the nearest one before a masked tail, after a masked head)."""
    row = torch.full((1000,), float("-inf"))
    row[300:700] = torch.linspace(-3, 3, 400)
    us = torch.tensor([0.0, 1e-300, 0.5, 1 - 2**-53], dtype=torch.float64)
    _, argmax, choice = ckernels.sample_rows(row.expand(4, 1000).contiguous(), torch.ones(4), us)
    assert all(300 <= c < 700 for c in choice.tolist()) and choice[0] == 300 and choice[3] == 699
    assert argmax.tolist() == [699] * 4
