"""Fixtures for every test area: paths to the repository and to the third-party reference data it carries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.reference import KSERVE_REFERENCE, R1_TOKENIZER_DIR, REPO_ROOT


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def kserve_reference_dir() -> Path:
    return KSERVE_REFERENCE


@pytest.fixture(scope="session")
def r1_tokenizer_dir() -> Path:
    return R1_TOKENIZER_DIR


@pytest.fixture(autouse=True)
def runtime_logging_restored():
    """A test that runs a runtime CLI calls configure_logging(), whose handlers bind the sys.stderr pytest
    swaps in per test; left installed they write to a closed file in every later test ("--- Logging error
    ---" noise). Put the runtime's loggers back as they were."""
    try:
        from model_runtime.log_config import LOGGERS, JsonFormatter
    except ImportError:  # an environment without the runtime's dependencies
        yield
        return
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in LOGGERS)]
    before = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    yield
    for lg, level, propagate, handlers in before:
        for handler in list(lg.handlers):
            if handler not in handlers and isinstance(handler.formatter, JsonFormatter):
                lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate
