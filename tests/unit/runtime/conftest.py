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


def _cuda_missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


_CUDA_SKIPPED: list[str] = []


def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests are skipped without a GPU, with the reason (and a summary line below)."""
    reason = _cuda_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=f"cuda test: {reason}"))
            _CUDA_SKIPPED.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _CUDA_SKIPPED:
        terminalreporter.write_line(f"{len(_CUDA_SKIPPED)} cuda tests skipped: {_cuda_missing()} "
                                    f"(run scripts/gpu_check.sh on a GPU machine)")
