"""Model-building fixtures for the runtime integration tests (tiny random models; no downloads)."""

from __future__ import annotations

import pytest

from tests.runtime_fixtures import build_tiny_qwen2_dir


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, r1_tokenizer_dir):
    """A HF Qwen2 checkout: config.json, random safetensors, R1 tokenizer + chat template, generation_config."""
    return build_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny-qwen2"), r1_tokenizer_dir)
