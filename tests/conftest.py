"""Fixtures shared by every test area: paths to the repository and to the read-only reference data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    # CI clones the repo with shared/ beside it; a developer checkout may carry shared/ inside.
    for candidate in (REPO_ROOT / "shared", REPO_ROOT.parent / "shared"):
        if (candidate / "reference").is_dir():
            return candidate
    raise RuntimeError("the read-only shared/ folder (KServe CRDs, R1 tokenizer) was not found beside the repo")


SHARED = _find_shared()
KSERVE_REFERENCE = SHARED / "reference" / "kserve-v0.20.0"
R1_TOKENIZER_DIR = SHARED / "reference" / "deepseek-r1-distill-qwen-tokenizer"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def kserve_reference_dir() -> Path:
    return KSERVE_REFERENCE


@pytest.fixture(scope="session")
def r1_tokenizer_dir() -> Path:
    return R1_TOKENIZER_DIR
