"""The KernelPlan (plan.py): decided once from the request and the machine (fake GPUs here), passed
down to the layers; the device-generic path against the fast CPU path; every tensor where the plan
says; --model_format reaching the loader; the dead helpers gone."""

from __future__ import annotations

import pytest
import torch

from model_runtime import build, ckernels, kernels, model, quant, quantize_cli
from model_runtime.config import ModelConfig
from model_runtime.kernels import Int4Linear, Int8Linear
from model_runtime.loader import ModelLoadError, load_model
from model_runtime.plan import Machine, PlanError, make_plan
from tests.cpu_kernels import needs_cpu_kernels
from tests.unit.runtime.test_quant import PROMPT, greedy

CFG = ModelConfig(arch="qwen2", hidden_size=1536, n_layers=2, n_heads=12, n_kv_heads=2, intermediate_size=8960,
                  vocab_size=1000, max_position=4096)  # the 1.5B's linear shapes
T4 = Machine("cuda:0", cuda_capability=(7, 5), cuda_name="Tesla T4")
A100 = Machine("cuda:0", cuda_capability=(8, 0), cuda_name="NVIDIA A100")
CPU_DQ = Machine("cpu", dq_available=True)
CPU_NO_DQ = Machine("cpu", dq_available=False, dq_problem="this CPU lacks AVX2")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("DISTILLERY_CPU_KERNELS", raising=False)
    monkeypatch.delenv("DISTILLERY_COMPILE", raising=False)
    monkeypatch.delenv("DISTILLERY_CUDA_INT8", raising=False)


def test_t4_runs_fp16_int8_on_cuda_and_int4_on_the_documented_generic_fallback():
    p8 = make_plan(CFG, T4, quantization="int8", lm_head="int8", embedding="int8")
    assert p8.float_dtype == p8.act_dtype == p8.kv_dtype == torch.float16
    assert (p8.backend, p8.lm_head_backend, p8.compile, p8.int8_kernel) == ("cuda-int8", "cuda-int8", True, "dequant")
    p4 = make_plan(CFG, T4, quantization="int4", group_size=128, lm_head="int8", embedding="int4")
    assert p4.backend == "generic" and p4.lm_head_backend == "cuda-int8"
    assert any("sm75" in n and "fallback" in n for n in p4.notes)
    # bf16 asked for on a T4: refused at plan time with the reason, as the operator's validation does
    with pytest.raises(PlanError, match="Tesla T4 has no bfloat16"):
        make_plan(CFG, T4, quantization="int8", dtype=torch.bfloat16)


def test_ampere_runs_bf16_and_tinygemm_int4():
    p = make_plan(CFG, A100, quantization="int4", group_size=128, lm_head="int8", embedding="int4")
    assert p.float_dtype == torch.bfloat16 and p.backend == "cuda-int4-tinygemm" and not p.notes
    # compiled or eager: the dequantize form (torch's int8pack kernel measured 7x slower on an H200); the
    # override still reaches it
    for compile in (True, False):
        assert make_plan(CFG, A100, quantization="int8", lm_head="int8", compile=compile).int8_kernel == "dequant"
    assert make_plan(CFG, A100, quantization="int8", compile=False, int8_kernel="int8pack_mm").int8_kernel \
        == "int8pack_mm"
    # fp16 asked for explicitly: tinygemm takes bf16 only -> the generic path, said in the notes
    p16 = make_plan(CFG, A100, quantization="int4", dtype=torch.float16)
    assert p16.backend == "generic" and any("bfloat16" in n for n in p16.notes)
    with pytest.raises(PlanError, match="CPU backend"):
        make_plan(CFG, A100, quantization="int8", kernels="dq")
    assert make_plan(CFG, A100, quantization="int8", kernels="generic").backend == "generic"


def test_cpu_plans():
    p = make_plan(CFG, CPU_DQ, quantization="int8", lm_head="int8", embedding="shared")
    assert (p.backend, p.fused_decode, p.act_dtype, p.kv_dtype, p.compile) == ("dq", True, torch.float32,
                                                                              torch.float32, False)
    assert p.sampler == "dq"  # the step's rows of logits in one C call where the dq kernels are loaded
    p = make_plan(CFG, CPU_DQ, quantization="int8", lm_head="none")  # float head: no fused step
    assert p.backend == "dq" and p.lm_head_backend == "dense" and not p.fused_decode and p.act_dtype == torch.bfloat16
    p = make_plan(CFG, CPU_NO_DQ, quantization="int4", lm_head="int8")
    assert p.backend == "aten" and any("AVX2" in n for n in p.notes)
    with pytest.raises(PlanError, match="unavailable"):
        make_plan(CFG, CPU_NO_DQ, quantization="int8", kernels="dq")
    p = make_plan(CFG, CPU_DQ, quantization="int4", lm_head="int8", kernels="generic")
    assert (p.backend, p.lm_head_backend, p.fused_decode, p.act_dtype) == ("generic", "generic", False, torch.bfloat16)
    assert p.sampler == "torch"
    with pytest.raises(PlanError, match="bogus"):
        make_plan(CFG, CPU_DQ, kernels="bogus")
    assert make_plan(CFG, CPU_DQ).backend == "dense"
    assert make_plan(CFG, CPU_DQ).sampler == make_plan(CFG, A100, quantization="int8").sampler == "torch"


def test_the_plan_is_logged_and_described_as_json(tiny_qwen2_dir, caplog):
    import json

    with caplog.at_level("INFO", logger="model_runtime.plan"):
        loaded = load_model(tiny_qwen2_dir, quantization="int8", kernels="generic")
    assert loaded.plan is not None and "kernel plan" in caplog.text
    d = loaded.plan.describe()
    json.dumps(d)
    assert d["backend"] == "generic" and d["float_dtype"] == "bfloat16" and d["device"] == "cpu"


def test_the_env_reaches_the_plan_and_the_layers(tiny_qwen2_dir, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CPU_KERNELS", "generic")
    loaded = load_model(tiny_qwen2_dir, quantization="int4", group_size=32)
    layers = [m for m in loaded.model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert layers and {m.backend for m in layers} == {"generic"}
    assert loaded.plan is not None and loaded.plan.backend == "generic" and not loaded.model.fused_decode


needs_dq = needs_cpu_kernels


@needs_dq
def test_the_plan_names_the_instruction_set_the_integer_kernels_run_on() -> None:
    """The probed machine's plan says which kernels decode (the best this CPU has, as ckernels picks);
    a plan without our kernels names none."""
    machine = Machine.probe(torch.device("cpu"))
    assert machine.dq_isa == ckernels.isa() == ckernels._load().available_isas()[0]
    plan = make_plan(CFG, machine, quantization="int4", lm_head="int8")
    assert plan.describe()["dq_isa"] == machine.dq_isa
    assert make_plan(CFG, machine, quantization="int4", lm_head="int8", kernels="aten").dq_isa == ""
    assert make_plan(CFG, CPU_NO_DQ, quantization="int8", lm_head="int8").dq_isa == ""


def test_one_int8_row_takes_the_256_bit_vnni_kernels_under_avx512() -> None:
    """plan.row_isas: under the AVX-512 kernels one int8 row takes the 256-bit VNNI ones, one int4 row the 512-bit
    ones (every CPU measured, Zen 4's half-width units included); below AVX-512 nothing is rerouted; a plan
    without our kernels, or with the set pinned, routes nothing."""
    avx512 = frozenset({"avx2", "avx512f", "avx512_vnni"})

    def cpu(isa: str, flags: frozenset[str] = avx512) -> Machine:
        return Machine("cpu", dq_available=True, dq_isa=isa, cpu_flags=flags)

    assert make_plan(CFG, cpu("avx512vnni"), quantization="int4", lm_head="int8").dq_row_isa == ("vnni256", "")
    assert make_plan(CFG, cpu("avx512vnni"), quantization="int8", lm_head="int8").describe()["dq_row_isa"] == \
        ["vnni256", ""]
    assert make_plan(CFG, cpu("avxvnni", frozenset({"avx2", "avx_vnni"})), quantization="int8",
                     lm_head="int8").dq_row_isa == ("", "")
    assert make_plan(CFG, cpu("avx512vnni"), quantization="int8", lm_head="int8", kernels="aten").dq_row_isa == \
        ("", "")
    pinned = Machine("cpu", dq_available=True, dq_isa="avx512vnni", dq_isa_pinned=True, cpu_flags=avx512)
    assert make_plan(CFG, pinned, quantization="int4", lm_head="int8").dq_row_isa == ("", "")  # forced / compared


def test_the_plan_names_the_batch_kernels_row_tile_where_they_have_one() -> None:
    """decode_row_tile: 8 where the decoder's int8 / int4 linears take the AVX-512 batch kernels (8 activation rows a
    pass), 0 where every row costs (AVX2 / AVX-VNNI kernels, PyTorch's, float weights, no integer kernels)."""
    avx512 = Machine("cpu", dq_available=True, dq_isa="avx512vnni", cpu_flags=frozenset({"avx2", "avx512f",
                                                                                         "avx512_vnni"}))
    avx2 = Machine("cpu", dq_available=True, dq_isa="avx2", cpu_flags=frozenset({"avx2"}))
    for q in ("int8", "int4"):
        assert make_plan(CFG, avx512, quantization=q, lm_head="int8").decode_row_tile == 8
        assert make_plan(CFG, avx512, quantization=q, lm_head="int8").describe()["decode_row_tile"] == 8
        assert make_plan(CFG, avx512, quantization=q, lm_head="int8", kernels="aten").decode_row_tile == 0
        assert make_plan(CFG, avx2, quantization=q, lm_head="int8").decode_row_tile == 0
        assert make_plan(CFG, CPU_NO_DQ, quantization=q, lm_head="int8").decode_row_tile == 0
    assert make_plan(CFG, avx512, quantization="none").decode_row_tile == 0


@needs_dq
def test_building_a_model_routes_one_row_calls_as_its_plan_says(tiny_qwen2_dir) -> None:
    """load_model applies the plan's row_isas to the (process-wide) kernels: what this CPU's plan says is what a
    one-row call runs on."""
    lib = ckernels._load()
    before = {bits: lib.set_row_isa(bits, "avx2") for bits in (8, 4)}  # not what any plan asks for both widths
    try:
        loaded = load_model(tiny_qwen2_dir, quantization="int8")
        assert (lib.row_isa(8), lib.row_isa(4)) == loaded.plan.dq_row_isa
        if loaded.plan.dq_isa == "avx512vnni":
            assert lib.call_isa(8, 1) == "avxvnni" and lib.call_isa(8, 2) == "avx512vnni"
        # a comparison of instruction sets (tests, bench `kernels`' per-set rows) measures that set alone: a model
        # loaded inside it reroutes nothing
        with lib.using_isa(lib.isa):
            inside = load_model(tiny_qwen2_dir, quantization="int4")
            assert inside.plan.dq_row_isa == ("", "")
            assert (lib.row_isa(8), lib.row_isa(4)) == ("", "")
            assert lib.call_isa(8, 1) == lib.call_isa(4, 1) == lib.isa
        assert (lib.row_isa(8), lib.row_isa(4)) == loaded.plan.dq_row_isa  # put back after the block
    finally:
        for bits, row in before.items():
            lib.set_row_isa(bits, row)


@needs_dq
def test_generic_int8_gives_the_fast_cpu_paths_greedy_tokens(tiny_qwen2_dir):
    fast = load_model(tiny_qwen2_dir, quantization="int8")
    generic = load_model(tiny_qwen2_dir, quantization="int8", kernels="generic")
    assert fast.plan is not None and fast.plan.backend == "dq" and fast.model.fused_decode
    assert generic.plan is not None and generic.plan.backend == "generic"
    fast_tokens, _ = greedy(fast.model, PROMPT, 12)
    generic_tokens, _ = greedy(generic.model, PROMPT, 12)
    assert generic_tokens == fast_tokens


@needs_dq
def test_generic_int4_logits_are_close_to_the_fast_cpu_path(tiny_qwen2_dir):
    fast = load_model(tiny_qwen2_dir, quantization="int4", group_size=32)
    generic = load_model(tiny_qwen2_dir, quantization="int4", group_size=32, kernels="generic", dtype="float32")
    assert generic.plan is not None and generic.plan.backend == "generic"
    _, a = greedy(fast.model, PROMPT, 1)
    _, b = greedy(generic.model, PROMPT, 1)
    # same codes; the fast path quantizes activations to int8 per block, generic multiplies in float32
    assert (a - b).norm() / b.norm() < 0.03 and int(a.argmax()) == int(b.argmax())


@pytest.mark.parametrize("method,kernels_choice", [("none", None), ("int8", None), ("int4", None),
                                                   ("int8", "generic"), ("int4", "generic"), ("int8", "aten")])
def test_every_tensor_is_on_the_planned_device_with_the_planned_dtype(tiny_qwen2_dir, method, kernels_choice):
    loaded = load_model(tiny_qwen2_dir, quantization=method, group_size=32, kernels=kernels_choice, device="cpu")
    plan = loaded.plan
    assert plan is not None and plan.device == "cpu"
    assert build.placement_problems(loaded.model, plan) == []
    floats = [t for t in [*loaded.model.parameters(), *loaded.model.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floats} <= {plan.float_dtype, plan.act_dtype, torch.bfloat16}
    assert all(t.device.type == "cpu" for t in [*loaded.model.parameters(), *loaded.model.buffers()])


def test_placement_check_catches_a_tensor_on_the_wrong_device_or_dtype(tiny_qwen2_dir):
    loaded = load_model(tiny_qwen2_dir, quantization="int8", kernels="generic")
    plan = loaded.plan
    assert plan is not None
    layer = loaded.model.layers[0].attn.o
    layer.scales = layer.scales.float()
    loaded.model.rope_cos = loaded.model.rope_cos.to("meta")
    problems = build.placement_problems(loaded.model, plan)
    assert any("layers.0.attn.o.scales is torch.float32" in p for p in problems)
    assert any("rope_cos" in p for p in problems)


def test_quantizers_put_their_outputs_on_the_requested_device():
    w = torch.randn(40, 64)
    codes, scales = kernels.quantize_int8(w, device="meta")
    assert codes.device.type == scales.device.type == "meta"
    q, s, z = kernels.quantize_int4_packed(w, 32, device="meta")
    assert q.device.type == s.device.type == z.device.type == "meta"
    codes, _ = kernels.quantize_int8(w)
    assert codes.device.type == "cpu"


def test_tinygemm_layout_puts_even_k_in_the_high_nibble():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    tg = kernels.tinygemm_layout(kernels.pack_nibbles(codes))
    assert torch.equal(tg >> 4, codes[:, 0::2]) and torch.equal(tg & 0xF, codes[:, 1::2])
    s, z = torch.randn(8, 2), torch.randn(8, 2)
    sz = kernels.tinygemm_scales_and_zeros(s, z)
    assert sz.shape == (2, 8, 2) and torch.equal(sz[1, 3], torch.stack([s[3, 1], z[3, 1]]).bfloat16())


def test_generic_matmuls_match_the_dequantized_reference():
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), torch.randn(3, 128)
    codes, scales = kernels.quantize_int8(w)
    ref8 = x @ (codes.float() * scales.float()[:, None]).T
    torch.testing.assert_close(kernels.int8_matmul_generic(x, codes, scales), ref8, atol=1e-4, rtol=1e-4)
    q, s, z = kernels.quantize_int4_packed(w, 32)
    ref4 = x @ kernels.dequantize_int4(kernels.unpack_nibbles(q), s, z).T
    torch.testing.assert_close(kernels.int4_matmul_generic(x, q, s, z), ref4, atol=1e-4, rtol=1e-4)


def test_model_format_reaches_the_loader(tiny_qwen2_dir, tiny_qwen2_gguf):
    with pytest.raises(ModelLoadError, match="--model_format gguf"):
        load_model(tiny_qwen2_dir, model_format="gguf")
    with pytest.raises(ModelLoadError, match="--model_format safetensors"):
        load_model(tiny_qwen2_gguf, model_format="safetensors")
    assert load_model(tiny_qwen2_dir, model_format="safetensors").source_format == "hf"


def test_the_dead_helpers_are_gone():
    assert not hasattr(quant, "quantize_model")
    assert not hasattr(Int8Linear, "from_float") and not hasattr(Int4Linear, "from_float")
    assert not hasattr(model.Transformer, "tie_weights") and not hasattr(model.KVCache, "nbytes")
    assert not hasattr(quantize_cli, "add_parser")


async def test_v1_models_shows_the_kernel_plan(r1_tokenizer_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tests.unit.runtime.test_serving import ScriptedEngine, http, make_app

    tok = AutoTokenizer.from_pretrained(str(r1_tokenizer_dir))
    engine = ScriptedEngine([1])
    engine.loaded = SimpleNamespace(plan=make_plan(CFG, T4, quantization="int4", lm_head="int8", embedding="int4"))
    app, _, _ = make_app(tok, engine=engine)
    async with http(app) as h:
        card = (await h.get("/openai/v1/models")).json()["data"][0]
        one = (await h.get("/openai/v1/models/r1")).json()
    assert card["kernel_plan"] == one["kernel_plan"]
    assert card["kernel_plan"]["backend"] == "generic" and card["kernel_plan"]["float_dtype"] == "float16"
    assert card["kernel_plan"]["machine"] == "Tesla T4" and card["kernel_plan"]["notes"]


def test_the_serving_command_reaches_the_plan(monkeypatch):
    from model_runtime.__main__ import build_parser, options_from_args

    base = ["--model_name", "m", "--model_dir", "/nowhere"]
    o = options_from_args(build_parser().parse_args([*base, "--kernel_backend", "generic", "--compile=false",
                                                     "--gpu_memory_utilization", "0.5", "--model_format", "gguf"]))
    assert (o.kernel_backend, o.compile, o.gpu_memory_utilization, o.model_format) == ("generic", False, 0.5, "gguf")
    monkeypatch.setenv("DISTILLERY_CPU_KERNELS", "generic")  # the documented environment variable: the default
    o = options_from_args(build_parser().parse_args(base))
    assert (o.kernel_backend, o.compile, o.gpu_memory_utilization) == ("generic", None, 0.9)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--gpu_memory_utilization", "1.5"])


def test_the_served_model_loads_with_the_requested_backend(tiny_qwen2_dir):
    from prometheus_client import CollectorRegistry

    from model_runtime.metrics import RuntimeMetrics
    from model_runtime.server import DistilleryModel, RuntimeOptions

    served = DistilleryModel(RuntimeOptions(model_name="m", model_dir=str(tiny_qwen2_dir), quantization="int8",
                                            kernel_backend="generic", model_format="safetensors", compile=False),
                             metrics=RuntimeMetrics("m", CollectorRegistry()))
    try:
        assert served.load()
        plan = served.kernel_plan()
        assert plan is not None and plan["backend"] == "generic" and plan["source_format"] == "hf"
    finally:
        served.stop()


def test_loading_the_server_freezes_what_load_left_out_of_the_cyclic_collector(tiny_qwen2_dir, monkeypatch):
    """gc.freeze once the engine runs and has warmed up: the full collections mid-step then skip the model's,
    tokenizer's and app's objects."""
    from prometheus_client import CollectorRegistry

    from model_runtime import server
    from model_runtime.metrics import RuntimeMetrics

    served = server.DistilleryModel(server.RuntimeOptions(model_name="m", model_dir=str(tiny_qwen2_dir)),
                                    metrics=RuntimeMetrics("m", CollectorRegistry()))
    frozen: list[bool] = []
    monkeypatch.setattr(server.gc, "freeze", lambda: frozen.append(served.generator is not None))
    try:
        assert served.load()
        assert frozen == [True]
    finally:
        served.stop()
