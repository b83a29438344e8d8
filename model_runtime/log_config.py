"""JSON log lines for the runtime, KServe and uvicorn (one object per line, for log shippers).

Prompt text never reaches the logs unless the operator asks for it (`--log_prompts`, debugging
only): serving.py adds a `prompt` field only then, and this formatter drops any `prompt` field that
slips through otherwise. (Named log_config, not logging, so `import logging` keeps meaning stdlib.)
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "color_message"}

_state = {"log_prompts": False}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            if key == "prompt" and not _state["log_prompts"]:
                continue
            entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


LOGGERS = ("model_runtime", "kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access")


def log_config(level: str = "INFO") -> dict[str, Any]:
    """A logging.config dict: the runtime's, KServe's and uvicorn's loggers write JSON to stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    names = LOGGERS
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {name: {"handlers": ["json"], "level": level, "propagate": False} for name in names},
        "root": {"handlers": ["json"], "level": "WARNING"},
    }


def configure_logging(level: str = "INFO", log_prompts: bool = False) -> None:
    _state["log_prompts"] = log_prompts
    logging.config.dictConfig(log_config(level))
