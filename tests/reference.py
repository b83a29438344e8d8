"""Where the third-party reference data the tests read lives (a plain module: tests and conftests import it)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Third-party files the tests read (CRD schemas, the real R1-Distill tokenizer) live in the repository,
# with their licences: a clone with nothing beside it runs every test.
REFERENCE_DIR = REPO_ROOT / "third_party" / "reference"
KSERVE_REFERENCE = REFERENCE_DIR / "kserve-v0.20.0"
TRAINER_REFERENCE = REFERENCE_DIR / "kubeflow-trainer-v2.3.0"
PROMETHEUS_OPERATOR_REFERENCE = REFERENCE_DIR / "prometheus-operator"
R1_TOKENIZER_DIR = REFERENCE_DIR / "deepseek-r1-distill-qwen-tokenizer"
