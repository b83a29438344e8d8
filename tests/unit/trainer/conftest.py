"""Fixtures for the trainer's unit tests: the real R1 tokenizer, a tiny teacher and student (no downloads)."""

from __future__ import annotations

import pytest

from tests.trainer_fixtures import build_student, build_teacher


@pytest.fixture(scope="session")
def r1_tokenizer(r1_tokenizer_dir):
    from distillery_trainer.models import load_tokenizer

    return load_tokenizer(r1_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, r1_tokenizer_dir):
    return build_teacher(tmp_path_factory.mktemp("teacher"), r1_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, r1_tokenizer_dir):
    return build_student(tmp_path_factory.mktemp("student"), r1_tokenizer_dir)
