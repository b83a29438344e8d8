"""The DistillationJob API: validation with field paths, the generated CRD (structural, described, CEL rules
that agree with Python, evaluated with a real CEL interpreter), and the TrainJob it renders, valid against
Kubeflow Trainer v2.3.0's TrainJob CRD with `additionalProperties: false` injected (unknown fields fail)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import cel
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery_contract.distillation import JOB_FILE, PVC_MOUNT_ROOT, RESULT_FILE, DistillationJobSpec
from distillery_operator import constants
from distillery_operator.api import InvalidSpec
from distillery_operator.cli import main as cli_main
from distillery_operator.crd import DJ_SPEC_RULES, build_distillation_crd
from distillery_operator.distillation_api import parse_distillation_job, trainjob_name_max
from distillery_operator.distillation_render import TRAINER_COMMAND, render_train_job
from distillery_operator.settings import OperatorSettings, RenderSettings
from tests.kserve_schema import assert_valid, kserve_validator
from tests.reference import TRAINER_REFERENCE

from .test_crd import apply_defaults, walk

REPO = Path(__file__).resolve().parents[3]
DJ_SAMPLES = sorted((REPO / "manifests" / "samples" / "distillation").glob("*.yaml"))
SETTINGS = RenderSettings()


def trainjob_validator():
    return kserve_validator(TRAINER_REFERENCE / "trainer.kubeflow.org_trainjobs.yaml")


def job(name: str = "r1-job", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "teacher": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
        "student": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
        "dataset": {"uri": "pvc://data/support.jsonl"},
        "output": {"uri": "s3://models/out"},
    }
    body.update(copy.deepcopy(spec))
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob",
            "metadata": {"name": name, "namespace": "ml"}, "spec": body}


def problems(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidSpec) as info:
        parse_distillation_job(obj)
    return [p.field for p in info.value.problems]


# ------------------------------------------------------------------------------------------ samples
def test_samples_render_valid_train_jobs() -> None:
    assert DJ_SAMPLES, "the issue's example ships as a sample"
    validator = trainjob_validator()
    for path in DJ_SAMPLES:
        dj = parse_distillation_job(yaml.safe_load(path.read_text()))
        train_job = render_train_job(dj, SETTINGS)
        assert_valid(validator, train_job)
        assert failing_cel_rules(yaml.safe_load(path.read_text())["spec"]) == [], path.name


def test_the_issue_example_renders_what_the_trainer_runs() -> None:
    dj = parse_distillation_job(yaml.safe_load((REPO / "manifests/samples/distillation/r1-support.yaml").read_text()))
    tj = render_train_job(dj, SETTINGS)
    trainer = tj["spec"]["trainer"]
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                        "name": constants.TRAINING_RUNTIME_NAME}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert trainer["image"] == constants.DEFAULT_TRAINER_IMAGE
    assert trainer["command"] == ["torchrun", "--no-python", "distillery-train"]
    assert trainer["args"] == ["-f", JOB_FILE]
    (patch,) = tj["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    manifest = json.loads(pod["metadata"]["annotations"][constants.ANN_JOB_MANIFEST])
    # The trainer reads the job back with the contract's own model: same spec, defaults filled in.
    assert manifest["kind"] == "DistillationJob" and manifest["metadata"]["name"] == "r1-support"
    assert DistillationJobSpec.model_validate(manifest["spec"]) == dj.spec.model_copy(update={"deploy": None})
    assert pod["spec"]["nodeSelector"] == {SETTINGS.gpu_node_label: "nvidia-a100-80gb"}
    assert {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "data"}} in pod["spec"]["volumes"]
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "pvc-0", "mountPath": f"{PVC_MOUNT_ROOT}/data"} in mounts
    assert any(m["mountPath"] == JOB_FILE.rsplit("/", 1)[0] for m in mounts)
    assert tj["metadata"]["labels"][constants.LABEL_JOB] == "r1-support"


def test_deploy_changes_no_train_job() -> None:
    a = render_train_job(parse_distillation_job(job(deploy={"distilledModel": "a"})), SETTINGS)
    b = render_train_job(parse_distillation_job(job(deploy={"distilledModel": "b"})), SETTINGS)
    assert a == b


def test_cpu_job_and_operator_settings() -> None:
    dj = parse_distillation_job(job(resources={"numNodes": 2, "gpusPerNode": 0, "hardwareProfile": "cpu",
                                               "cpu": "8", "memory": "32Gi"}))
    settings = OperatorSettings(trainer_image="registry.local/trainer:dev", training_runtime_name="my-rt")
    tj = render_train_job(dj, settings.render_settings())
    assert_valid(trainjob_validator(), tj)
    trainer = tj["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 1, "registry.local/trainer:dev")
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    assert tj["spec"]["runtimeRef"]["name"] == "my-rt"
    pod = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert "nodeSelector" not in pod["template"]["spec"]["template"]["spec"]


def test_the_chart_runtime_runs_what_the_train_jobs_expect() -> None:
    """The chart's ClusterTrainingRuntime (default values) and the renderer agree on names, command and image."""
    runtime = yaml.safe_load((REPO / "manifests/runtime/clustertrainingruntime-distillery-distillation.yaml").read_text())
    assert_valid(kserve_validator(TRAINER_REFERENCE / "trainer.kubeflow.org_clustertrainingruntimes.yaml"), runtime)
    assert runtime["metadata"]["name"] == SETTINGS.training_runtime_name
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (container,) = node["template"]["spec"]["template"]["spec"]["containers"]
    assert node["name"] == container["name"] == constants.TRAINER_NODE_JOB
    assert container["command"] == list(TRAINER_COMMAND) and container["args"] == ["-f", JOB_FILE]
    assert container["image"] == SETTINGS.trainer_image
    assert container["terminationMessagePath"] == RESULT_FILE
    assert "torch" in runtime["spec"]["mlPolicy"]


def test_default_trainer_image_tag_is_the_chart_app_version() -> None:
    chart = yaml.safe_load((REPO / "charts/distillery/Chart.yaml").read_text())
    assert constants.DEFAULT_TRAINER_IMAGE.endswith(":" + chart["appVersion"])


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("spec", "field"), [
    ({"loss": {"temperature": 0}}, "spec.loss.temperature"),
    ({"loss": {"alpha": 1.5}}, "spec.loss.alpha"),
    ({"loss": {"alpha": -0.1}}, "spec.loss.alpha"),
    ({"lora": {"rank": 8}}, "spec.lora"),
    ({"teacher": {"uri": "ftp://x/y"}}, "spec.teacher.uri"),
    ({"output": {"uri": "s3://"}}, "spec.output.uri"),
    ({"student": {"uri": "s3://b/s", "revision": "main"}}, "spec.student.revision"),
    ({"resources": {"gpusPerNode": 2, "hardwareProfile": "cpu"}}, "spec.resources.gpusPerNode"),
    ({"resources": {"gpusPerNode": 9, "hardwareProfile": "h100"}}, "spec.resources.gpusPerNode"),
    ({"resources": {"gpusPerNode": 0, "hardwareProfile": "l4"}}, "spec.resources.gpusPerNode"),
    ({"training": {"precision": "bf16"}, "resources": {"hardwareProfile": "t4"}}, "spec.training.precision"),
    ({"deploy": {"distilledModel": "Not_A_Name"}}, "spec.deploy.distilledModel"),
    ({"method": "lora", "lora": {"rank": 8, "typo": 1}}, "spec.lora.typo"),
    ({"trainng": {}}, "spec.trainng"),
])
def test_invalid_specs_are_refused_naming_the_field(spec, field) -> None:
    assert field in problems(job(**spec))


def test_names_must_fit_a_train_job() -> None:
    assert "metadata.name" in problems(job(name="R1_job"))
    longest = "a" * trainjob_name_max(1)
    parse_distillation_job(job(name=longest))
    assert "metadata.name" in problems(job(name=longest + "a"))
    assert "metadata.name" in problems(job(name=longest, resources={"numNodes": 12}))


def test_cli_renders_and_validates_a_job(tmp_path, capsys) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job()))
    assert cli_main(["render", "-f", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "TrainJob"
    path.write_text(yaml.safe_dump(job(lora={"rank": 4})))
    assert cli_main(["validate", "-f", str(path)]) == 1
    assert "spec.lora" in capsys.readouterr().err


def test_cli_prints_the_distillation_crd(capsys) -> None:
    assert cli_main(["crd", "--kind", "DistillationJob"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == build_distillation_crd()


# ------------------------------------------------------------------------------------------ CRD + CEL
@pytest.fixture(scope="module")
def dj_version() -> dict[str, Any]:
    return build_distillation_crd()["spec"]["versions"][0]


def test_crd_is_structural_described_with_columns(dj_version) -> None:
    crd = build_distillation_crd()
    assert crd["spec"]["names"]["shortNames"] == ["dj"] and crd["spec"]["names"]["plural"] == "distillationjobs"
    assert "distillery" in crd["spec"]["names"]["categories"]
    assert dj_version["subresources"] == {"status": {}}
    assert [c["name"] for c in dj_version["additionalPrinterColumns"]] == ["Phase", "Progress", "Teacher", "Student",
                                                                          "Age"]
    spec = dj_version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in walk(spec, "spec"):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "const"} & set(node), path
        if path != "spec" and not path.endswith("[]"):  # list items are described by their list
            assert node.get("description"), f"{path} has no description"
    assert spec["properties"]["loss"]["properties"]["temperature"]["exclusiveMinimum"] is True


def failing_cel_rules(spec: dict[str, Any]) -> list[str]:
    version = build_distillation_crd()["spec"]["versions"][0]
    defaulted = apply_defaults(copy.deepcopy(spec), version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return [r["message"] for r in DJ_SPEC_RULES if not cel.evaluate(r["rule"], {"self": defaulted})]


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"lora": {"rank": 8}}, "lora settings"),
    ({"method": "full", "lora": {"rank": 8}}, "lora settings"),
    ({"student": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}}, "the student is the teacher"),
    ({"resources": {"gpusPerNode": 2, "hardwareProfile": "cpu"}}, "cpu has no GPU"),
    ({"resources": {"gpusPerNode": 0, "hardwareProfile": "h100"}}, "gpusPerNode >= 1"),
    ({"training": {"precision": "bf16"}, "resources": {"hardwareProfile": "t4"}}, "bfloat16"),
    ({"teacher": {"uri": "ftp://a/b"}}, "teacher.uri"),
    ({"output": {"uri": "s3://"}}, "output.uri"),
    ({"student": {"uri": "s3://a/b", "revision": "main"}}, "revision applies"),
])
def test_cel_rules_refuse_what_python_refuses(spec, fragment) -> None:
    obj = job(**spec)
    with pytest.raises(InvalidSpec):
        parse_distillation_job(obj)
    assert any(fragment in message for message in failing_cel_rules(obj["spec"])), failing_cel_rules(obj["spec"])


def test_cel_rules_accept_valid_edge_cases() -> None:
    for spec in ({"method": "lora", "lora": {"rank": 8}}, {"method": "lora"},
                 {"resources": {"gpusPerNode": 0, "hardwareProfile": "cpu"}},
                 {"student": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "revision": "v2"}}):
        parse_distillation_job(job(**spec))
        assert failing_cel_rules(job(**spec)["spec"]) == [], spec


# ------------------------------------------------------------------------------------------ sweep
uris = st.sampled_from(["hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "s3://bucket/student", "gs://b/x",
                        "pvc://models/student", "pvc://scratch/a/b/c"])
names = st.from_regex(r"[a-z][a-z0-9]{0,20}(-[a-z0-9]{1,8}){0,2}", fullmatch=True)


@st.composite
def valid_specs(draw) -> dict[str, Any]:
    teacher = draw(st.sampled_from(["hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "pvc://models/teacher"]))
    spec: dict[str, Any] = {
        "teacher": {"uri": teacher, **({"revision": "main"} if teacher.startswith("hf://") and draw(st.booleans())
                                       else {})},
        "student": {"uri": draw(uris)},
        "dataset": {"uri": draw(st.sampled_from(["pvc://data/d.jsonl", "s3://b/d.jsonl", "hf://org/ds"])),
                    "format": draw(st.sampled_from(["chat", "text"])),
                    "validationFraction": draw(st.floats(0, 0.5))},
        "output": {"uri": draw(st.sampled_from(["s3://models/out", "pvc://out/student", "gs://m/o"]))},
        "loss": {"temperature": draw(st.floats(0.1, 100)), "alpha": draw(st.floats(0, 1))},
        "training": {"epochs": draw(st.floats(0.1, 10)), "batchSize": draw(st.integers(1, 64)),
                     "maxSeqLength": draw(st.integers(16, 8192)), "seed": draw(st.integers(0, 2**31))},
    }
    if draw(st.booleans()):
        spec["method"] = "lora"
        spec["lora"] = {"rank": draw(st.integers(1, 64)), "targetModules": ["q_proj", "k_proj"]}
    if draw(st.booleans()):
        spec["training"]["maxSteps"] = draw(st.integers(1, 10_000))
    profile = draw(st.sampled_from([None, "cpu", "t4", "l4", "a100-80gb", "h100"]))
    gpus = 0 if profile == "cpu" else draw(st.integers(1 if profile else 0, 8))
    spec["resources"] = {"numNodes": draw(st.integers(1, 16)), "gpusPerNode": gpus}
    if profile:
        spec["resources"]["hardwareProfile"] = profile
    if draw(st.booleans()):
        spec["resources"].update(cpu=draw(st.sampled_from(["8", "500m"])), memory=draw(st.sampled_from(["64Gi", "1Ti"])))
    if draw(st.booleans()):
        spec["quantization"] = {"method": draw(st.sampled_from(["int8", "int4"])),
                                "groupSize": draw(st.sampled_from([32, 64, 128]))}
    if draw(st.booleans()):
        spec["deploy"] = {"distilledModel": draw(names)}
    return spec


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, spec=valid_specs())
def test_property_valid_specs_render_valid_train_jobs(name, spec) -> None:
    obj = job(name=name)
    obj["spec"] = copy.deepcopy(spec)
    try:
        dj = parse_distillation_job(obj)
    except InvalidSpec as error:
        raise AssertionError(f"strategy drew an invalid spec: {error}") from None
    assert failing_cel_rules(spec) == []
    tj = render_train_job(dj, SETTINGS)
    assert_valid(trainjob_validator(), tj)
    assert tj["spec"]["trainer"]["numProcPerNode"] == max(1, spec["resources"]["gpusPerNode"])
    claims = {u.split("/")[2] for u in (spec["teacher"]["uri"], spec["student"]["uri"], spec["dataset"]["uri"],
                                        spec["output"]["uri"]) if u.startswith("pvc://")}
    pod = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = pod["template"]["spec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} == claims
