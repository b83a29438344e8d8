"""Model-building fixtures for the runtime unit tests (tiny random models; no downloads)."""

from __future__ import annotations

import pytest

from tests.runtime_fixtures import build_tiny_gguf, build_tiny_qwen2_dir


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, r1_tokenizer_dir):
    """A HF Qwen2 checkout: config.json, random safetensors, R1 tokenizer + chat template, generation_config."""
    return build_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny-qwen2"), r1_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tmp_path_factory, tiny_qwen2_dir):
    """The same tiny model as a Q8_0 GGUF file with the R1 tokenizer and chat template in its metadata."""
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-q8_0.gguf", tiny_qwen2_dir, quant="Q8_0")
