"""The Helm chart, through the real helm binary: lint, render, schema-validate every object, refuse bad values.

Every rendered object is validated: core kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the ClusterServingRuntimes against KServe v0.20's CRD, ServiceMonitor and
PodMonitor against prometheus-operator's CRDs (reference/), all with unknown fields rejected; CRDs must
be structural. The chart's wiring is checked against the Python side it configures: the operator's
settings and CLI, the runtime contract, the renderer's runtime names, model format and labels.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from distillery_contract import flags
from distillery_operator import constants
from distillery_operator.api import parse_distilled_model
from distillery_operator.cli import build_parser
from distillery_operator.crd import build_crd
from distillery_operator.monitoring import alerts, dashboard
from distillery_operator.render import render_inference_service
from distillery_operator.settings import OperatorSettings
from tests.kserve_schema import assert_valid, kserve_validator
from tests.reference import PROMETHEUS_OPERATOR_REFERENCE, TRAINER_REFERENCE

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KUBE_VERSION = kubernetes_validate.latest_version()
# kopf's peering objects: their CRD (crds/kopf-peerings.yaml) has only a free-form status.
KOPF_PEERING_KINDS = {("kopf.dev/v1", "KopfPeering"), ("kopf.dev/v1", "ClusterKopfPeering")}


@pytest.fixture(scope="module")
def crd_validators(kserve_reference_dir: Path) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> strict validator, for the custom kinds the chart renders."""
    return {
        ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): kserve_validator(
            kserve_reference_dir / "serving.kserve.io_clusterservingruntimes.yaml"
        ),
        ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): kserve_validator(
            TRAINER_REFERENCE / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
        ),
        ("monitoring.coreos.com/v1", "PodMonitor"): kserve_validator(
            PROMETHEUS_OPERATOR_REFERENCE / "monitoring.coreos.com_podmonitors.yaml", "v1"
        ),
        ("monitoring.coreos.com/v1", "ServiceMonitor"): kserve_validator(
            PROMETHEUS_OPERATOR_REFERENCE / "monitoring.coreos.com_servicemonitors.yaml", "v1"
        ),
        ("monitoring.coreos.com/v1", "PrometheusRule"): kserve_validator(
            PROMETHEUS_OPERATOR_REFERENCE / "monitoring.coreos.com_prometheusrules.yaml", "v1"
        ),
    }


def validate_object(obj: dict[str, Any], crd_validators: dict[tuple[str, str], Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_validators:
        assert_valid(crd_validators[key], obj)
    elif key in KOPF_PEERING_KINDS:
        assert set(obj) == {"apiVersion", "kind", "metadata"}, obj
    else:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(map(str, error.path))
            raise AssertionError(f"{key} {obj['metadata']['name']}: {error.message} at {path}") from None


# Keywords a structural schema may not use (k8s.io/apiextensions-apiserver structural schema rules).
FORBIDDEN_KEYWORDS = {
    "$ref",
    "definitions",
    "$defs",
    "dependencies",
    "dependentSchemas",
    "$schema",
    "id",
    "$id",
    "patternProperties",
    "additionalItems",
    "const",
    "if",
    "then",
    "else",
}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


INT_OR_STRING_JUNCTOR = [{"type": "integer"}, {"type": "string"}]  # the one typed anyOf Kubernetes allows


def structural_problems(node: dict[str, Any], path: str = "", in_junctor: bool = False) -> list[str]:
    """Why a CRD schema is not structural, or not OpenAPI v3 as Kubernetes reads it (empty when fine)."""
    problems = [f"{path}: forbidden keyword {k}" for k in FORBIDDEN_KEYWORDS & set(node)]
    # OpenAPI v3.0 (Kubernetes' JSONSchemaProps): exclusiveMinimum/Maximum are booleans beside
    # minimum/maximum, not numbers as in JSON Schema 2020-12 (which pydantic emits).
    problems += [
        f"{path}: {k} must be a boolean (with minimum/maximum), got {node[k]!r}"
        for k in ("exclusiveMinimum", "exclusiveMaximum")
        if k in node and not isinstance(node[k], bool)
    ]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if int_or_string and not in_junctor:
        for junctor in ("anyOf", "allOf"):
            if node.get(junctor) == INT_OR_STRING_JUNCTOR:
                node = {k: v for k, v in node.items() if k != junctor}
    if path == ".metadata" and node == {"type": "object"}:
        return problems  # the root metadata: the API server owns its schema
    if in_junctor:
        problems += [
            f"{path}: {k} inside allOf/anyOf/oneOf/not"
            for k in ("type", "description", "default", "additionalProperties", "nullable")
            if k in node
        ]
    elif "type" not in node and not (preserve or int_or_string):
        problems.append(f"{path}: no type")
    free_object = "properties" not in node and "additionalProperties" not in node and not preserve
    if node.get("type") == "object" and not in_junctor and free_object:
        problems.append(
            f"{path}: object with neither properties, additionalProperties nor "
            "x-kubernetes-preserve-unknown-fields"
        )
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}", in_junctor)
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]", in_junctor)
    elif "items" in node:
        problems.append(f"{path}: items must be a single schema")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*", in_junctor)
    for junctor in JUNCTORS:
        subs = node.get(junctor)
        for i, sub in enumerate([subs] if isinstance(subs, dict) else subs or []):
            problems += structural_problems(sub, f"{path}.{junctor}[{i}]", True)
    return problems


def runtime_names(r) -> set[str]:
    return {o["metadata"]["name"] for o in r.of_kind("ClusterServingRuntime")}


def peering_on(r) -> bool:
    op = r.values["operator"]
    return bool(op["peering"]["enabled"]) or op["replicas"] > 1


def watched_namespaces(r) -> list[str] | None:
    """None when cluster-wide."""
    watch = r.values["operator"]["watch"]
    if watch["allNamespaces"]:
        return None
    return watch["namespaces"] or ["distillery-system"]


# --- lint, render, validate ----------------------------------------------------------------------------


def test_helm_is_v4(helm_run) -> None:
    assert helm_run("version", "--short").stdout.startswith("v4.")


def test_lint_strict(helm_run, chart_dir, rendered) -> None:
    result = helm_run("lint", "--strict", str(chart_dir), *rendered.values_args)
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_renders_on_the_oldest_supported_kubernetes(helm_run, chart_dir) -> None:
    kube_version = yaml.safe_load((chart_dir / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.match(r">=\s*([0-9.]+)", kube_version).group(1)
    helm_run("template", "x", str(chart_dir), "--kube-version", oldest)
    too_old = helm_run("template", "x", str(chart_dir), "--kube-version", "1.20.0", check=False)
    assert too_old.returncode != 0 and "kubeVersion" in too_old.stderr


def test_every_rendered_object_validates_against_its_schema(rendered, crd_validators) -> None:
    assert rendered.objects
    for obj in rendered.objects:
        validate_object(obj, crd_validators)


def test_no_two_objects_share_kind_namespace_and_name(rendered) -> None:
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered.objects]
    assert len(keys) == len(set(keys))


def test_every_crd_is_structural(rendered) -> None:
    crds = rendered.of_kind("CustomResourceDefinition")
    assert crds
    for crd in crds:
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert structural_problems(schema) == [], crd["metadata"]["name"]


def test_structural_check_catches_non_structural_schemas() -> None:
    assert structural_problems({"type": "object", "properties": {"a": {}}}) == [".a: no type"]
    assert structural_problems({"type": "object"})
    assert structural_problems({"type": "object", "properties": {"a": {"$ref": "#/x", "type": "string"}}})
    assert structural_problems({"type": "string", "anyOf": [{"type": "string"}]})
    assert structural_problems({"type": "object", "x-kubernetes-preserve-unknown-fields": True}) == []
    assert structural_problems({"type": "number", "minimum": 0, "exclusiveMinimum": 0.0})
    assert structural_problems({"type": "number", "minimum": 0, "exclusiveMinimum": True}) == []
    int_or_string = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert structural_problems(int_or_string) == []
    assert structural_problems({"type": "object", "properties": {"metadata": {"type": "object"}}}) == []


# --- the DistilledModel CRD --------------------------------------------------------------------------


def test_distilledmodel_crd_is_the_one_generated_from_the_api_models(rendered_default) -> None:
    crd = rendered_default.one("CustomResourceDefinition", "distilledmodels.distillery.dev")
    assert crd["spec"] == build_crd()["spec"], "the chart's CRD file is stale: run `make manifests`"
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "distillery"


def test_crds_enabled_and_keep_switches(render_chart) -> None:
    off = render_chart("crds-off")
    assert "distilledmodels.distillery.dev" not in {
        o["metadata"]["name"] for o in off.of_kind("CustomResourceDefinition")
    }
    assert "manifests/crd/" in off.notes
    no_keep = render_chart("replicas-2-peering").one(
        "CustomResourceDefinition", "distilledmodels.distillery.dev"
    )
    assert "annotations" not in no_keep["metadata"]


# --- the operator Deployment --------------------------------------------------------------------------


def test_operator_pod_is_locked_down(rendered) -> None:
    pod = rendered.deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert len(pod["containers"]) == 1
    c = rendered.operator_container
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(c["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert c["image"].startswith(rendered.values["operator"]["image"]["repository"])


def test_liveness_probe_targets_the_port_kopf_listens_on(rendered) -> None:
    c = rendered.operator_container
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[probe["port"]] == int(rendered.env["DISTILLERY_LIVENESS_PORT"])
    assert ports["metrics"] == int(rendered.env["DISTILLERY_METRICS_PORT"])


def test_operator_env_builds_valid_settings(rendered, monkeypatch) -> None:
    fields = set(OperatorSettings.model_fields)
    for name in rendered.env:
        if name.startswith("DISTILLERY_"):
            assert name.removeprefix("DISTILLERY_").lower() in fields, f"{name}: no such operator setting"
    for name in [n for n in os.environ if n.startswith("DISTILLERY_")]:
        monkeypatch.delenv(name)
    for name, value in rendered.env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.namespaces == (watched_namespaces(rendered) or [])
    assert settings.standalone is (not peering_on(rendered))
    assert settings.peering_name == rendered.values["operator"]["peering"]["name"]
    assert settings.prometheus_url == rendered.values["keda"]["prometheusUrl"]
    assert settings.resync_seconds == rendered.values["operator"]["resyncSeconds"]
    assert settings.log_format == rendered.values["operator"]["logFormat"]
    assert settings.runtime_image == (rendered.values["operator"]["runtimeImageOverride"] or None)
    # The runtimes the operator names in InferenceServices are the ones the chart installs.
    installed = runtime_names(rendered)
    for variant, setting in (("cpu", settings.runtime_name_cpu), ("gpu", settings.runtime_name_gpu)):
        if rendered.values["runtime"][variant]["enabled"]:
            assert setting in installed


def test_operator_args_are_what_distillery_run_accepts(rendered) -> None:
    args = build_parser().parse_args(["run", *rendered.operator_container["args"]])
    namespaces = watched_namespaces(rendered)
    assert args.all_namespaces is (namespaces is None)
    assert (args.namespace or None) == namespaces
    assert args.standalone is (not peering_on(rendered))


def test_peering_objects_strategy_and_rbac_follow_replicas(rendered) -> None:
    deployment = rendered.deployment
    assert deployment["spec"]["replicas"] == rendered.values["operator"]["replicas"]
    name = rendered.env["DISTILLERY_PEERING_NAME"]
    namespaces = watched_namespaces(rendered)
    cluster = rendered.of_kind("ClusterKopfPeering")
    namespaced = rendered.of_kind("KopfPeering")
    if not peering_on(rendered):
        assert cluster == [] and namespaced == []
        # Standalone: two operator pods must never overlap, not even during a rollout.
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        return
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    crd_names = {o["metadata"]["name"] for o in rendered.of_kind("CustomResourceDefinition")}
    if namespaces is None:
        assert [o["metadata"]["name"] for o in cluster] == [name] and namespaced == []
        assert "clusterkopfpeerings.kopf.dev" in crd_names
    else:
        assert cluster == []
        assert sorted((o["metadata"]["namespace"], o["metadata"]["name"]) for o in namespaced) == sorted(
            (ns, name) for ns in namespaces
        )
        assert "kopfpeerings.kopf.dev" in crd_names


def test_image_digest_pins_the_operator_image(render_chart) -> None:
    r = render_chart("replicas-2-peering")
    digest = r.values["operator"]["image"]["digest"]
    assert r.operator_container["image"] == f"{r.values['operator']['image']['repository']}@{digest}"


# --- the ClusterServingRuntimes -----------------------------------------------------------------------


def _flag_value(args: list[str], flag: str) -> str | None:
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def test_runtimes_follow_the_runtime_contract(rendered) -> None:
    contract_flags = {v for k, v in vars(flags).items() if k.startswith("FLAG_")}
    for rt in rendered.of_kind("ClusterServingRuntime"):
        spec = rt["spec"]
        assert [f["name"] for f in spec["supportedModelFormats"]] == [constants.MODEL_FORMAT_NAME]
        assert {"v1", "v2"} <= set(spec["protocolVersions"])
        (c,) = spec["containers"]
        assert c["name"] == "kserve-container"
        args = c["args"]
        assert {a.split("=", 1)[0] for a in args} <= contract_flags, "a runtime flag that distillery_contract.flags lacks"
        assert _flag_value(args, flags.FLAG_MODEL_NAME) == "{{.Name}}"
        assert _flag_value(args, flags.FLAG_MODEL_DIR) == flags.MODEL_MOUNT_DIR
        assert _flag_value(args, flags.FLAG_HTTP_PORT) == str(flags.RUNTIME_HTTP_PORT)
        device = _flag_value(args, flags.FLAG_DEVICE)
        variant = rt["metadata"]["labels"]["distillery.dev/runtime-variant"]
        assert device == {"cpu": "cpu", "gpu": "cuda"}[variant]
        assert c["image"].endswith({"cpu": "-cpu", "gpu": "-cuda"}[variant])
        assert [p["containerPort"] for p in c["ports"]] == [flags.RUNTIME_HTTP_PORT]
        ready = flags.HEALTH_READY_PATH_TEMPLATE.format(model_name="{{.Name}}")
        assert c["readinessProbe"]["httpGet"] == {"path": ready, "port": flags.RUNTIME_HTTP_PORT}
        assert c["livenessProbe"]["httpGet"] == {
            "path": flags.HEALTH_LIVE_PATH,
            "port": flags.RUNTIME_HTTP_PORT,
        }
        assert spec["annotations"] == {
            "serving.kserve.io/enable-prometheus-scraping": "true",
            "prometheus.kserve.io/port": str(flags.RUNTIME_HTTP_PORT),
            "prometheus.kserve.io/path": flags.METRICS_PATH,
        }
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "/tmp" in mounts  # the root filesystem is read-only
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])


def test_default_runtimes_are_the_ones_the_operator_names(rendered_default) -> None:
    assert runtime_names(rendered_default) == {constants.RUNTIME_NAME_CPU, constants.RUNTIME_NAME_GPU}
    gpu = rendered_default.one("ClusterServingRuntime", constants.RUNTIME_NAME_GPU)
    assert gpu["spec"]["containers"][0]["resources"]["limits"][constants.DEFAULT_GPU_RESOURCE] == "1"
    cpu = rendered_default.one("ClusterServingRuntime", constants.RUNTIME_NAME_CPU)
    assert constants.DEFAULT_GPU_RESOURCE not in json.dumps(cpu["spec"]["containers"][0]["resources"])


def test_gpu_only_values(render_chart) -> None:
    r = render_chart("gpu-runtime")
    (rt,) = r.of_kind("ClusterServingRuntime")
    assert rt["metadata"]["name"] == "llm-runtime-gpu" == r.env["DISTILLERY_RUNTIME_NAME_GPU"]
    c = rt["spec"]["containers"][0]
    assert c["image"] == "registry.example.com/ml/distillery-runtime:0.1.0-cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert rt["spec"]["supportedModelFormats"][0] == {
        "name": constants.MODEL_FORMAT_NAME,
        "version": "1",
        "autoSelect": True,
        "priority": 5,
    }
    shm = next(v for v in rt["spec"]["volumes"] if v["name"] == "devshm")
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"


def test_samples_render_onto_an_installed_runtime_and_format(rendered_default, monkeypatch) -> None:
    for name, value in rendered_default.env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings().render_settings()
    runtimes = {o["metadata"]["name"]: o for o in rendered_default.of_kind("ClusterServingRuntime")}
    samples = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
    assert samples
    for sample in samples:
        for doc in yaml.safe_load_all(sample.read_text()):
            isvc = render_inference_service(parse_distilled_model(doc), settings)
            model = isvc["spec"]["predictor"]["model"]
            assert model["runtime"] in runtimes, sample.name
            formats = runtimes[model["runtime"]]["spec"]["supportedModelFormats"]
            assert model["modelFormat"]["name"] in {f["name"] for f in formats}
            # The PodMonitor (metrics.runtime.podMonitor) finds runtime pods by this label.
            assert constants.LABEL_MODEL in isvc["metadata"]["labels"]
            # KServe appends the model's args to the runtime's: each side owns its own flags.
            base = {a.split("=", 1)[0] for a in runtimes[model["runtime"]]["spec"]["containers"][0]["args"]}
            assert not base & {a.split("=", 1)[0] for a in model.get("args", [])}, sample.name


# --- monitoring -----------------------------------------------------------------------------------------


def test_monitoring_objects_only_when_asked(rendered_default, render_chart) -> None:
    for kind in ("Service", "ServiceMonitor", "PodMonitor"):
        assert rendered_default.of_kind(kind) == []
    r = render_chart("metrics-on")
    service, monitor, pods = r.one("Service"), r.one("ServiceMonitor"), r.one("PodMonitor")
    pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in r.operator_container["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pods["spec"]["selector"]["matchExpressions"] == [
        {"key": constants.LABEL_MODEL, "operator": "Exists"}
    ]
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    runtime_ports = {
        p["name"] for rt in r.of_kind("ClusterServingRuntime") for p in rt["spec"]["containers"][0]["ports"]
    }
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] in runtime_ports
    assert pods["spec"]["podMetricsEndpoints"][0]["path"] == flags.METRICS_PATH
    assert r.env["DISTILLERY_PROMETHEUS_URL"] == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"


def test_alert_rules_and_dashboard_only_when_asked(rendered_default, render_chart) -> None:
    """Off by default; when on, the PrometheusRule carries exactly the rules and the ConfigMap exactly the
    dashboard that distillery_operator.monitoring builds (the same PromQL as the rollout gates)."""
    assert rendered_default.of_kind("PrometheusRule") == []
    assert [c for c in rendered_default.of_kind("ConfigMap") if "dashboard" in c["metadata"]["name"]] == []
    r = render_chart("metrics-on")
    rule = r.one("PrometheusRule")
    assert rule["spec"]["groups"] == alerts.rule_groups()
    assert rule["metadata"]["labels"]["role"] == "alert-rules"  # what a Prometheus ruleSelector matches
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [board_map] = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert board_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board_map["metadata"]["namespace"] == "monitoring"
    assert board_map["metadata"]["annotations"] == {"grafana_folder": "LLMs"}
    board = json.loads(board_map["data"]["distillery-models.json"])
    assert {k: v for k, v in board.items() if k != "description"} == dashboard.dashboard()


# --- values and schema ----------------------------------------------------------------------------------


def test_invalid_values_are_rejected_by_the_schema(helm_run, chart_dir, invalid_values) -> None:
    result = helm_run("template", "x", str(chart_dir), "--values", str(invalid_values), check=False)
    assert result.returncode != 0, f"{invalid_values.name} was accepted"
    assert "schema" in result.stderr.lower(), result.stderr


def test_set_flag_typos_are_rejected_too(helm_run, chart_dir) -> None:
    result = helm_run(
        "template", "x", str(chart_dir), "--set", "operator.replicas=2,operator.replicaz=3", check=False
    )
    assert result.returncode != 0 and "replicaz" in result.stderr


# Schema objects that stay free-form on purpose: Kubernetes types the chart passes through verbatim.
FREE_FORM = {"global", "valueFrom", "nodeAffinity", "podAffinity", "podAntiAffinity"}


def test_schema_is_strict_everywhere(chart_dir) -> None:
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    loose = []

    def walk(node: dict[str, Any], path: str) -> None:
        if (
            node.get("type") == "object"
            and "additionalProperties" not in node
            and path.rsplit(".", 1)[-1] not in FREE_FORM
        ):
            loose.append(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")
        for name, sub in node.get("definitions", {}).items():
            walk(sub, f"#{name}")

    walk(schema, "$")
    assert loose == []


def test_every_value_is_documented(chart_dir) -> None:
    """Every key in values.yaml has a comment right above it, or sits under a key that has one."""
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    previous = ""
    for line in (chart_dir / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([\w./\"-]+):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = previous.lstrip().startswith("#") or any(d for _, d in stack)
            is_parent = line.rstrip().endswith(":")
            if not documented and not is_parent:
                undocumented.append(match.group(2))
            stack.append((indent, previous.lstrip().startswith("#")))
        if line.strip():
            previous = line
    assert undocumented == []


def test_values_yaml_keys_are_all_in_the_schema(chart_dir) -> None:
    schema = json.loads((chart_dir / "values.schema.json").read_text())
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return resolve(schema["definitions"][ref.rsplit("/", 1)[1]]) if ref else node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


# --- images and NOTES ----------------------------------------------------------------------------------


def test_chart_images_are_the_ones_the_documented_docker_builds_produce(rendered_default, chart_dir) -> None:
    readme = (chart_dir / "README.md").read_text()
    built = set(re.findall(r"docker build [^\n]*?-t (\S+)", readme))
    images = {rendered_default.operator_container["image"]}
    images |= {
        rt["spec"]["containers"][0]["image"] for rt in rendered_default.of_kind("ClusterServingRuntime")
    }
    assert images == built
    for dockerfile in re.findall(r"docker build -f (\S+)", readme):
        assert (REPO / dockerfile).is_file(), dockerfile


def test_notes_tell_the_next_steps(rendered) -> None:
    assert "kubectl get dm" in rendered.notes
    assert "kubectl apply -f manifests/samples/" in rendered.notes
    if not rendered.values["keda"]["enabled"]:
        assert "keda.enabled=false" in rendered.notes
