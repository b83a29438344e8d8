"""spec.serving.responseCache: off by default, bounded, rendered into the runtime's flags (which its real
parser accepts), refused with a message naming the field when out of bounds or duplicated in args."""

from __future__ import annotations

import pytest

from distillery_contract import flags
from distillery_operator.api import InvalidSpec, parse_distilled_model
from distillery_operator.render import render_inference_service, runtime_args
from model_runtime.__main__ import build_parser
from tests.kserve_admission import admission_errors
from tests.kserve_schema import assert_valid

from .conftest import minimal_dm


def cache_args(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--response_cache_")]


def test_off_by_default_and_no_flag_rendered():
    dm = parse_distilled_model(minimal_dm())
    assert dm.spec.serving.response_cache.enabled is False
    assert cache_args(runtime_args(dm.spec)) == []
    # a disabled cache's sizes are kept in the spec but do not turn it on
    dm = parse_distilled_model(minimal_dm(serving={"responseCache": {"maxEntries": 5, "ttlSeconds": 9}}))
    assert cache_args(runtime_args(dm.spec)) == []


def test_enabled_cache_renders_the_runtime_flags_its_parser_reads(render_settings, isvc_validator):
    obj = minimal_dm(serving={"responseCache": {"enabled": True, "maxEntries": 250, "ttlSeconds": 45}})
    dm = parse_distilled_model(obj)
    assert cache_args(runtime_args(dm.spec)) == [f"{flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES}=250",
                                                  f"{flags.FLAG_RESPONSE_CACHE_TTL_S}=45"]
    isvc = render_inference_service(dm, render_settings)
    assert_valid(isvc_validator, isvc)
    assert admission_errors(isvc) == []
    rendered = isvc["spec"]["predictor"]["model"]["args"]
    parsed = build_parser().parse_args([f"{flags.FLAG_MODEL_NAME}=r1", *rendered])
    assert (parsed.response_cache_max_entries, parsed.response_cache_ttl_s) == (250, 45.0)


def test_defaults_when_enabled():
    dm = parse_distilled_model(minimal_dm(serving={"responseCache": {"enabled": True}}))
    assert cache_args(runtime_args(dm.spec)) == [f"{flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES}=1000",
                                                  f"{flags.FLAG_RESPONSE_CACHE_TTL_S}=600"]


@pytest.mark.parametrize(("cache", "field", "fragment"), [
    ({"enabled": True, "maxEntries": 0}, "spec.serving.responseCache.maxEntries", "greater than or equal to 1"),
    ({"enabled": True, "maxEntries": 1_000_001}, "spec.serving.responseCache.maxEntries", "less than or equal"),
    ({"enabled": True, "ttlSeconds": 0}, "spec.serving.responseCache.ttlSeconds", "greater than or equal to 1"),
    ({"ttlSeconds": 86_401}, "spec.serving.responseCache.ttlSeconds", "less than or equal to 86400"),
    ({"enabled": "sometimes"}, "spec.serving.responseCache.enabled", "valid boolean"),
    ({"maxBytes": 10}, "spec.serving.responseCache.maxBytes", "unknown field"),
])
def test_out_of_bounds_is_refused_naming_the_field(cache, field, fragment):
    with pytest.raises(InvalidSpec) as info:
        parse_distilled_model(minimal_dm(serving={"responseCache": cache}))
    problems = {p.field: p.message for p in info.value.problems}
    assert fragment in problems[field], problems


def test_the_cache_flags_in_args_are_refused_they_would_override_the_field():
    obj = minimal_dm(serving={"responseCache": {"enabled": True}, "args": [f"{flags.FLAG_RESPONSE_CACHE_TTL_S}=5"]})
    with pytest.raises(InvalidSpec) as info:
        parse_distilled_model(obj)
    assert "spec.serving.responseCache" in {p.field: p.message for p in info.value.problems}["spec.serving.args"]
    # the byte bound has no field: args may set it
    dm = parse_distilled_model(minimal_dm(serving={"responseCache": {"enabled": True},
                                                   "args": [f"{flags.FLAG_RESPONSE_CACHE_MAX_BYTES}=1048576"]}))
    assert runtime_args(dm.spec)[-1] == f"{flags.FLAG_RESPONSE_CACHE_MAX_BYTES}=1048576"


def test_the_cpu_sample_turns_it_on(sample_objects, render_settings):
    dm = parse_distilled_model(sample_objects["r1-distill-qwen-1.5b-int4-cpu.yaml"])
    assert cache_args(runtime_args(dm.spec)) == [f"{flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES}=2000",
                                                  f"{flags.FLAG_RESPONSE_CACHE_TTL_S}=900"]
