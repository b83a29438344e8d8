"""The contract between the halves: what the renderer writes, the runtime accepts and exports.

Every InferenceService the renderer produces (samples and a sweep of specs) must carry runtime args that
the real runtime parser (`python -m model_runtime`) accepts with the same meaning, and every metric name a
KEDA query uses must be one the runtime exports.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from distillery_contract import flags, metric_names, values
from distillery_operator.api import parse_distilled_model
from distillery_operator.crd import build_crd
from distillery_operator.render import render_inference_service
from distillery_operator.settings import RenderSettings
from model_runtime.__main__ import build_parser
from model_runtime.metrics import RuntimeMetrics

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("*.yaml"))
# What the ClusterServingRuntime itself passes before the InferenceService's args (KServe appends ours).
RUNTIME_ARGS = [f"{flags.FLAG_MODEL_NAME}=m", f"{flags.FLAG_MODEL_DIR}={flags.MODEL_MOUNT_DIR}",
                f"{flags.FLAG_HTTP_PORT}={flags.RUNTIME_HTTP_PORT}"]


def rendered(obj):
    return render_inference_service(parse_distilled_model(obj), RenderSettings())


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_runtime_parser_accepts_rendered_args_with_their_meaning(path):
    obj = yaml.safe_load(path.read_text())
    dm = parse_distilled_model(obj)
    args = rendered(obj)["spec"]["predictor"]["model"]["args"]
    ns = build_parser().parse_args(RUNTIME_ARGS + args)
    spec = dm.spec
    assert ns.quantization == spec.quantization.method.value
    assert ns.max_model_len == spec.serving.max_model_len
    assert ns.max_batch_size == spec.serving.max_batch_size
    assert ns.max_queue == spec.serving.max_queue
    assert ns.default_temperature == pytest.approx(spec.serving.sampling.temperature)
    assert ns.default_top_p == pytest.approx(spec.serving.sampling.top_p)
    assert ns.default_max_tokens == spec.serving.sampling.max_tokens
    assert bool(ns.think_prefix) == spec.serving.reasoning.think_prefix
    assert bool(ns.separate_reasoning) == spec.serving.reasoning.separate_reasoning
    assert bool(ns.prequantized) == spec.quantization.prequantized
    if spec.quantization.method.value == "int4":
        assert ns.group_size == spec.quantization.group_size


def test_extreme_spec_values_are_accepted_by_the_runtime():
    obj = yaml.safe_load(SAMPLES[0].read_text())
    obj["spec"]["serving"] = {"maxQueue": 1, "maxBatchSize": 1, "maxModelLen": 128, "dtype": "float32",
                              "sampling": {"temperature": 0, "topP": 1, "maxTokens": 1},
                              "reasoning": {"thinkPrefix": False, "separateReasoning": False}}
    args = rendered(obj)["spec"]["predictor"]["model"]["args"]
    ns = build_parser().parse_args(RUNTIME_ARGS + args)
    assert (ns.max_queue, ns.default_temperature, ns.think_prefix, ns.dtype) == (1, 0.0, False, "float32")


def test_every_contract_flag_is_a_runtime_flag():
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    declared = {value for name, value in vars(flags).items() if name.startswith("FLAG_")}
    assert declared <= options, declared - options


def _choices(flag: str) -> list[object]:
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    return list(action.choices or [])


def test_allowed_values_are_the_same_in_the_crd_and_the_runtime_parser():
    """Each allowed value is written once (distillery_contract.values): the CRD's enums and the runtime's
    argparse choices both come from it, so a value one side accepts the other accepts too."""
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    quant, serving = spec["quantization"]["properties"], spec["serving"]["properties"]
    assert quant["method"]["enum"] == _choices(flags.FLAG_QUANTIZATION) == list(values.QUANT_METHODS)
    assert quant["groupSize"]["enum"] == _choices(flags.FLAG_GROUP_SIZE) == list(values.INT4_GROUP_SIZES)
    assert serving["dtype"]["enum"] == _choices(flags.FLAG_DTYPE) == list(values.DTYPES)
    assert spec["model"]["properties"]["format"]["enum"] == _choices(flags.FLAG_MODEL_FORMAT)[1:]
    assert _choices(flags.FLAG_MODEL_FORMAT)[0] == "auto"
    # the defaults agree too: a model with no serving section runs with the runtime's own defaults
    defaults = build_parser().parse_args(RUNTIME_ARGS)
    assert (serving["maxBatchSize"]["default"], serving["maxQueue"]["default"]) == (
        defaults.max_batch_size, defaults.max_queue) == (values.DEFAULT_MAX_BATCH_SIZE, values.DEFAULT_MAX_QUEUE)
    assert quant["groupSize"]["default"] == defaults.group_size == values.DEFAULT_GROUP_SIZE


def test_keda_queries_use_metrics_the_runtime_exports():
    registry = CollectorRegistry()
    RuntimeMetrics("m", registry=registry)
    exported = {metric.name for metric in registry.collect()}
    for path in SAMPLES:
        obj = yaml.safe_load(path.read_text())
        for metric in rendered(obj)["spec"]["predictor"].get("autoScaling", {}).get("metrics", []):
            query = metric["external"]["metric"]["query"]
            names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))
            ours = {n for n in names if n.startswith("distillery_")}
            assert ours and ours <= exported, (query, exported)
            assert f'{metric_names.METRIC_LABEL_MODEL}="' in query
