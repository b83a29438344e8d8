"""End to end on tiny models: distillation lowers KL(teacher || student) on held-out text, the artifact
(weights, tokenizer, lineage.json with every weight's sha256, the pre-quantized copy) is what the runtime
loads and serves, resume from a checkpoint equals an uninterrupted run, LoRA trains only adapters and merges
into a plain model, and a 2-process torchrun (gloo, CPU) matches one process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from distillery_contract.distillation import LINEAGE_FILE, QUANTIZED_SUBDIR, DistillationJobSpec, TrainResult
from distillery_trainer.run import Overrides, run_job
from tests.integration.trainer.conftest import KD_SPEC
from tests.reference import REPO_ROOT
from tests.trainer_fixtures import job_spec, write_job

pytestmark = pytest.mark.integration
PROMPT = [151646, 151644, 9707, 1879, 151645]


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_distillation_lowers_kl_on_held_out_text(distilled):
    validation = distilled.lineage["metrics"]["validation"]
    before, after = validation["before"], validation["after"]
    assert before["tokens"] == after["tokens"] > 50  # the same held-out examples, before and after
    assert after["kl"] < 0.7 * before["kl"], validation  # a clear margin, not noise
    assert after["loss"] < before["loss"]


def test_the_lineage_names_sources_settings_results_and_weight_hashes(distilled, pvc):
    lineage = distilled.lineage
    assert lineage["teacher"] == {"uri": "pvc://models/teacher", "revision": None}
    assert lineage["student"]["uri"] == "pvc://models/student"
    dataset_sha = "sha256:" + hashlib.sha256(pvc.dataset.read_bytes()).hexdigest()
    assert lineage["dataset"] == {"uri": "pvc://data/support.jsonl", "format": "chat", "sha256": dataset_sha,
                                  "examples": {"train": 18, "validation": 6}}
    assert lineage["loss"] == {"temperature": 2.0, "alpha": 0.7}
    assert lineage["method"] == "full" and lineage["lora"] is None
    assert lineage["training"]["learningRate"] == 1e-2 and lineage["training"]["maxSteps"] == 6
    assert lineage["steps"] == 6 and lineage["training"]["worldSize"] == 1
    train = lineage["metrics"]["train"]
    assert train["loss"] > 0 and train["seconds"] > 0
    assert 6 * 4 * 10 < train["tokens"] <= 6 * 4 * 47  # 6 steps of 4 chats, cut at 48 tokens (47 targets)
    assert "distillery-trainer" in lineage["codeVersion"] and "transformers" in lineage["codeVersion"]
    out = distilled.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert files == ["model.safetensors", f"{QUANTIZED_SUBDIR}/model.safetensors"]
    listed = {**lineage["weights"], **lineage["quantized"]["weights"]}
    assert listed == {f: "sha256:" + hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}
    assert lineage["quantized"]["method"] == "int8"
    # the quantized copy carries the same lineage (the runtime serving it reports it)
    assert json.loads((out / QUANTIZED_SUBDIR / LINEAGE_FILE).read_text())["weights"] == lineage["weights"]
    assert not (out / "checkpoints").exists()  # finished: nothing left to resume


def test_the_result_for_the_operator(distilled):
    result = TrainResult.model_validate(distilled.result)
    assert result.artifact.uri == "pvc://models/out"
    assert result.artifact.sha256 == hashlib.sha256((distilled.output / LINEAGE_FILE).read_bytes()).hexdigest()
    assert result.progress is not None and (result.progress.step, result.progress.total_steps) == (6, 6)
    assert result.lineage["klAfter"] == distilled.lineage["metrics"]["validation"]["after"]["kl"]
    progress = json.loads((distilled.output / "progress.json").read_text())
    assert (progress["step"], progress["total"], progress["done"]) == (6, 6, True)


def test_the_artifact_is_a_checkpoint_the_runtime_serves(distilled):
    from transformers import AutoModelForCausalLM

    from model_runtime.loader import load_model

    out = distilled.output
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    loaded = load_model(out, dtype="float32", device="cpu")
    with torch.inference_mode():
        ours = loaded.model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None],
                            loaded.model.new_cache(1, 16), slice(0, 1))[0]
        reference = hf(torch.tensor([PROMPT])).logits[0, -1]
    assert torch.allclose(ours.flatten()[-reference.numel():], reference, atol=1e-4)
    assert loaded.tokenizer.chat_template


def test_the_prequantized_artifact_loads_in_the_runtime(distilled):
    from model_runtime.loader import load_model

    loaded = load_model(distilled.output / QUANTIZED_SUBDIR, prequantized=True, dtype="float32", device="cpu")
    assert loaded.quantization == "int8" and loaded.source_format == "quantized"
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None],
                              loaded.model.new_cache(1, 16), slice(0, 1))
    assert torch.isfinite(logits).all()


class StopAt(TrainerCallback):
    """Stop after the given step (as a preempted pod would, right after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(distilled, pvc, tmp_path: Path):
    spec = DistillationJobSpec.model_validate(KD_SPEC)  # the distilled run's, without the quantized copy
    overrides = Overrides(teacher=pvc.teacher, student=pvc.student, dataset=pvc.dataset, output=tmp_path / "out")
    first = run_job(spec, overrides, callbacks=[StopAt(3)], progress_bar=False)
    assert first.lineage is None and first.steps == 3
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    second = run_job(spec, overrides, progress_bar=False)
    assert second.steps == 6 and second.lineage is not None
    resumed, uninterrupted = weights(tmp_path / "out"), weights(distilled.output)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_lora_trains_only_adapters_and_merges_into_a_servable_model(pvc, tmp_path: Path):
    from model_runtime.loader import load_model

    seen: dict[str, list[str]] = {}

    class Trainable(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["names"] = [n for n, p in model.named_parameters() if p.requires_grad]

    spec = DistillationJobSpec.model_validate(job_spec(
        method="lora", lora={"rank": 4, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
        dataset={"validationFraction": 0.0}, training={"maxSteps": 2, "learningRate": 5e-2}))
    result = run_job(spec, Overrides(teacher=pvc.teacher, student=pvc.student, dataset=pvc.dataset,
                                     output=tmp_path / "out"), callbacks=[Trainable()], progress_bar=False)
    assert seen["names"] and all(".lora_A." in n or ".lora_B." in n for n in seen["names"])
    assert result.lineage is not None and result.lineage["lora"]["rank"] == 4
    merged, base = weights(tmp_path / "out"), weights(pvc.student)
    assert merged.keys() == base.keys()  # a plain checkpoint: no adapter tensors
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    loaded = load_model(tmp_path / "out", dtype="float32", device="cpu")
    assert loaded.config.n_layers == 1


def test_two_process_torchrun_and_accumulation_match_one_process(pvc, tmp_path: Path):
    # every example is cut to the same length and one step covers the whole training set, so one process
    # with batch 8, two with 4 each, and one accumulating two batches of 4 see the same tokens per step: the
    # same gradients, up to float sums
    texts = tmp_path / "long.jsonl"
    texts.write_text("".join(json.dumps({"text": f"Ticket {i}: " + "please help me with my order " * 6}) + "\n"
                             for i in range(8)))
    dataset = {"format": "text", "validationFraction": 0.0}
    training = {"maxSteps": 2, "maxSeqLength": 24, "saveSteps": 100, "learningRate": 1e-2}
    single = job_spec(dataset=dataset, training={**training, "batchSize": 8})
    double = job_spec(dataset=dataset, training={**training, "batchSize": 4})
    accumulated = job_spec(dataset=dataset, training={**training, "batchSize": 4, "gradientAccumulationSteps": 2})
    local = ["--teacher", str(pvc.teacher), "--student", str(pvc.student), "--dataset", str(texts), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "distillery_trainer", "-f", str(write_job(tmp_path / "double.yaml", double)),
         "--output", str(tmp_path / "ddp"), *local],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lineage = json.loads((tmp_path / "ddp" / LINEAGE_FILE).read_text())
    assert lineage["training"]["worldSize"] == 2 and lineage["steps"] == 2
    from distillery_trainer.cli import main

    assert main(["-f", str(write_job(tmp_path / "single.yaml", single)), "--output", str(tmp_path / "one"),
                 *local]) == 0
    assert main(["-f", str(write_job(tmp_path / "accumulated.yaml", accumulated)), "--output", str(tmp_path / "ga"),
                 *local]) == 0
    ddp, one, ga = weights(tmp_path / "ddp"), weights(tmp_path / "one"), weights(tmp_path / "ga")
    student = weights(pvc.student)
    for name, tensor in one.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(ga[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(one[k], student[k]) for k in one)  # and both did train
    # AdamW barely sees a constant factor on the gradients, so check the loss scale itself: accumulating two
    # micro-batches reports (and so optimizes) the same mean loss as one batch of both, not twice it
    losses = {run: json.loads((tmp_path / run / LINEAGE_FILE).read_text())["metrics"]["train"]["meanLoss"]
              for run in ("one", "ga", "ddp")}
    assert losses["ga"] == pytest.approx(losses["one"], rel=1e-4)
    assert losses["ddp"] == pytest.approx(losses["one"], rel=1e-4)  # the Trainer averages it over the ranks
