"""The `distillery` CLI: render prints valid InferenceService YAML; validate lists every problem and exits 1."""

from __future__ import annotations

import subprocess
import sys

import yaml

from distillery_operator.cli import main
from tests.kserve_admission import admission_errors
from tests.kserve_schema import assert_valid

BAD_DM = """
apiVersion: distillery.dev/v1alpha1
kind: DistilledModel
metadata:
  name: Bad_Name
spec:
  model:
    uri: ftp://models/r1
  quantization:
    method: int4
    groupSize: 100
  autoscaling:
    minReplicas: 4
    maxReplicas: 2
"""


def test_render_sample_prints_a_valid_inference_service(sample_paths, isvc_validator, capsys):
    assert main(["render", "-f", str(sample_paths[0])]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == 1 and docs[0]["kind"] == "InferenceService"
    assert_valid(isvc_validator, docs[0])
    assert admission_errors(docs[0]) == []


def test_render_with_namespace_override(sample_paths, capsys):
    assert main(["render", "-f", str(sample_paths[0]), "-n", "team-a"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["namespace"] == "team-a"


def test_validate_lists_every_problem_and_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_DM)
    assert main(["validate", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert "invalid" in err
    assert "spec.quantization.groupSize" in err  # schema problems are listed together
    path.write_text(BAD_DM.replace("groupSize: 100", "groupSize: 128"))
    assert main(["validate", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    for field in ("metadata.name", "spec.model.uri", "spec.autoscaling.minReplicas"):
        assert field in err, err


def test_render_refuses_invalid_input_without_printing_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_DM)
    assert main(["render", "-f", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "spec.quantization.groupSize" in out.err


def test_validate_multi_document_file_and_yaml_errors(sample_paths, tmp_path, capsys):
    combined = tmp_path / "all.yaml"
    combined.write_text("\n---\n".join(p.read_text() for p in sample_paths))
    assert main(["validate", "-f", str(combined)]) == 0
    assert capsys.readouterr().out.count(": valid") == len(sample_paths)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed")
    assert main(["validate", "-f", str(broken)]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 2


def test_crd_command_and_console_script(repo_root):
    result = subprocess.run([sys.executable, "-m", "distillery_operator.cli", "crd"], capture_output=True, text=True,
                            check=True, cwd=repo_root)
    crd = yaml.safe_load(result.stdout)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["shortNames"] == ["dm"]
