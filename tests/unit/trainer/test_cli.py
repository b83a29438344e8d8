"""distillery-train's error exits: every problem of an invalid job with its field path (exit 2), a job
that cannot run with the reason (exit 1); and the storage locations and progress lines it uses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from distillery_trainer import storage
from distillery_trainer.cli import EXIT_FAILED, EXIT_INVALID, load_job, main
from distillery_trainer.progress import (
    PROGRESS_PREFIX,
    ProgressReporter,
    parse_progress_line,
    progress_record,
)
from tests.trainer_fixtures import copy_with_other_tokenizer, job_spec, write_job


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_a_valid_job_parses_from_the_resource_or_the_bare_spec(tmp_path: Path):
    spec = load_job(write_job(tmp_path / "job.yaml", job_spec()))
    assert spec.training.max_steps == 6 and spec.loss.alpha == 0.7
    (tmp_path / "bare.yaml").write_text(json.dumps(job_spec()))
    assert load_job(tmp_path / "bare.yaml") == spec


def test_every_field_problem_is_listed_with_its_path(tmp_path: Path, capsys):
    bad = job_spec(loss={"temperature": 0, "alpha": 1.5}, training={"batchSize": 0, "lerningRate": 1e-4})
    code, err = run_cli(capsys, "-f", str(write_job(tmp_path / "job.yaml", bad)))
    assert code == EXIT_INVALID
    for line in ("spec.loss.temperature: Input should be greater than 0",
                 "spec.loss.alpha: Input should be less than or equal to 1",
                 "spec.training.batchSize: Input should be greater than or equal to 1",
                 "spec.training.lerningRate: Extra inputs are not permitted"):
        assert line in err


def test_cross_field_problems_are_listed_with_their_paths(tmp_path: Path, capsys):
    bad = job_spec(student={"uri": "pvc://models/teacher"}, dataset={"uri": "ftp://x/d.jsonl"},
                   lora={"rank": 4})
    code, err = run_cli(capsys, "-f", str(write_job(tmp_path / "job.yaml", bad)))
    assert code == EXIT_INVALID
    assert "spec.student.uri: the student is the teacher" in err
    assert "spec.dataset.uri: unknown URI scheme 'ftp://'" in err
    assert "spec.lora: lora settings apply only to method lora" in err


@pytest.mark.parametrize("content,message", [
    ("a: [b", "not YAML"),
    ("- 1\n- 2", "expected a DistillationJob"),
    ("kind: DistilledModel\nspec: {}", "kind: expected DistillationJob, got 'DistilledModel'"),
])
def test_a_file_that_is_no_job_is_refused(tmp_path: Path, capsys, content: str, message: str):
    (tmp_path / "job.yaml").write_text(content)
    code, err = run_cli(capsys, "-f", str(tmp_path / "job.yaml"))
    assert code == EXIT_INVALID and message in err


def test_a_missing_file_and_bad_max_steps(tmp_path: Path, capsys):
    code, err = run_cli(capsys, "-f", str(tmp_path / "nope.yaml"))
    assert code == EXIT_INVALID and "cannot read" in err
    job = write_job(tmp_path / "job.yaml", job_spec())
    code, err = run_cli(capsys, "-f", str(job), "--max-steps", "0")
    assert code == EXIT_INVALID and "--max-steps must be at least 1" in err


def test_an_unmounted_claim_fails_with_the_path(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path / "pvc"))
    code, err = run_cli(capsys, "-f", str(write_job(tmp_path / "job.yaml", job_spec())))
    assert code == EXIT_FAILED
    assert f"pvc://models/teacher: {tmp_path}/pvc/models/teacher does not exist" in err
    assert f"is claim models mounted at {tmp_path}/pvc/models?" in err


def test_a_tokenizer_mismatch_exits_with_the_reason(tmp_path: Path, capsys, tiny_teacher_dir: Path,
                                                    tiny_student_dir: Path):
    other = copy_with_other_tokenizer(tiny_student_dir, tmp_path / "student")
    job = write_job(tmp_path / "job.yaml", job_spec())
    code, err = run_cli(capsys, "-f", str(job), "--teacher", str(tiny_teacher_dir), "--student", str(other),
                        "--dataset", str(tmp_path / "unused.jsonl"), "--output", str(tmp_path / "out"))
    assert code == EXIT_FAILED
    assert "error: the teacher and the student do not share a tokenizer" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_pvc_uris_map_under_the_mount_root(tmp_path: Path):
    assert storage.pvc_path("pvc://data/a/b.jsonl", tmp_path) == tmp_path / "data" / "a" / "b.jsonl"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("{}")
    assert storage.fetch("pvc://data/x.jsonl", root=tmp_path) == tmp_path / "data" / "x.jsonl"
    target = storage.output_target("pvc://models/out", root=tmp_path)
    assert target.local == tmp_path / "models" / "out" and target.publish is None


def test_object_stores_without_their_library_say_which_is_missing(tmp_path: Path, monkeypatch):
    import fsspec

    def no_backend(scheme: str):  # as fsspec does when s3fs / gcsfs is not installed
        raise ImportError(f"Install {scheme}fs to access {scheme}")

    monkeypatch.setattr(fsspec, "filesystem", no_backend)
    with pytest.raises(storage.StorageError, match=r"s3://b/m: reading and writing s3:// needs fsspec and s3fs"):
        storage.fetch("s3://b/m", cache=tmp_path)
    with pytest.raises(storage.StorageError, match=r"gs://b/out: reading and writing gs:// needs fsspec and gcsfs"):
        storage.output_target("gs://b/out", staging=tmp_path)


def test_progress_lines_and_file(tmp_path: Path):
    out = io.StringIO()
    reporter = ProgressReporter(tmp_path / "progress.json", stream=out)
    reporter.report(progress_record(3, 10, 1.25, kl=0.5))
    line = out.getvalue().strip()
    assert line.startswith(PROGRESS_PREFIX)
    record = parse_progress_line(line)
    assert record is not None and (record["step"], record["total"], record["loss"], record["kl"]) == (3, 10, 1.25, 0.5)
    assert json.loads((tmp_path / "progress.json").read_text()) == record
    assert parse_progress_line("{'step': 1}") is None
    assert parse_progress_line(PROGRESS_PREFIX + "not json") is None


def test_object_store_sources_are_downloaded_and_outputs_uploaded(tmp_path: Path, monkeypatch):
    # fsspec's in-memory filesystem stands in for s3fs: no network
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    memory = MemoryFileSystem()
    memory.store.clear()
    monkeypatch.setattr(fsspec, "filesystem", lambda scheme: memory)
    memory.pipe("s3://bucket/data/support.jsonl", b'{"text": "hi"}\n')
    memory.pipe("s3://bucket/models/student/config.json", b"{}")
    memory.pipe("s3://bucket/models/student/model.safetensors", b"weights")
    assert storage.fetch("s3://bucket/data/support.jsonl", cache=tmp_path).read_bytes() == b'{"text": "hi"}\n'
    local = storage.fetch("s3://bucket/models/student", cache=tmp_path)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]

    target = storage.output_target("s3://bucket/out/run1", staging=tmp_path / "staging")
    (target.local / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (target.local / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (target.local / "quantized").mkdir()
    (target.local / "model.safetensors").write_bytes(b"w")
    (target.local / "quantized" / "model.safetensors").write_bytes(b"q")
    assert target.publish is not None
    target.publish()
    uploaded = sorted(memory.find("s3://bucket/out/run1"))
    # everything but the checkpoints (a working area, not part of the artifact)
    assert uploaded == ["s3://bucket/out/run1/model.safetensors", "s3://bucket/out/run1/quantized/model.safetensors"]
    memory.store.clear()


def test_the_job_file_the_operator_renders_is_what_the_trainer_reads(tmp_path: Path, repo_root: Path):
    # the two halves meet at JOB_FILE: every sample DistillationJob, as the TrainJob's pods receive it
    import yaml

    from distillery_operator.distillation_api import DistillationJob
    from distillery_operator.distillation_render import job_manifest

    samples = [*sorted((repo_root / "manifests" / "samples").rglob("*.yaml")),
               repo_root / "trainer" / "examples" / "distillationjob-demo.yaml"]
    jobs = [d for s in samples for d in yaml.safe_load_all(s.read_text()) if d and d.get("kind") == "DistillationJob"]
    assert len(jobs) >= 2
    for doc in jobs:
        job = DistillationJob.model_validate(doc)
        (tmp_path / "job.json").write_text(json.dumps(job_manifest(job)))
        assert load_job(tmp_path / "job.json") == job.spec.model_copy(update={"deploy": None})
