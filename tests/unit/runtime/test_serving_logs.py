"""JSON log lines, and no prompt text in them unless --log_prompts asks for it."""

from __future__ import annotations

import json
import logging
import sys
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from model_runtime import log_config
from model_runtime.protocol import CompletionRequest
from model_runtime.serving import Serving, ServingConfig

SECRET = "my password is hunter2"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serving_log():
    handler = Capture()
    logger = logging.getLogger("model_runtime.serving")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    log_config._state["log_prompts"] = False


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompt_text_is_logged_only_when_asked(r1_tokenizer_dir, serving_log, log_prompts):
    tokenizer = AutoTokenizer.from_pretrained(str(r1_tokenizer_dir))
    loaded = SimpleNamespace(tokenizer=tokenizer, eos_token_ids=[151643], max_model_len=256, generation_defaults={})
    serving = Serving(loaded, engine=None, config=ServingConfig(model_name="m", log_prompts=log_prompts))
    log_config._state["log_prompts"] = log_prompts
    job = serving.prepare_completion(CompletionRequest(model="m", prompt=SECRET))
    lines = [json.loads(log_config.JsonFormatter().format(r)) for r in serving_log.records]
    accepted = next(line for line in lines if line["msg"] == "request accepted")
    assert accepted["request_id"] == job.request_id and accepted["prompt_tokens"] == len(job.prompt_ids)
    assert accepted["level"] == "info" and accepted["logger"] == "model_runtime.serving"
    assert (SECRET in json.dumps(lines)) is log_prompts


def test_formatter_drops_a_stray_prompt_field_and_keeps_exceptions():
    formatter = log_config.JsonFormatter()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    record.prompt = SECRET
    record.request_id = "r1"
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert line["msg"] == "failed here" and line["request_id"] == "r1" and "prompt" not in line
    assert "ValueError: boom" in line["exc"]


def test_log_config_routes_kserve_and_uvicorn_through_json():
    cfg = log_config.log_config("WARNING")
    for name in ("model_runtime", "kserve", "uvicorn", "uvicorn.access"):
        assert cfg["loggers"][name]["handlers"] == ["json"] and cfg["loggers"][name]["level"] == "WARNING"
