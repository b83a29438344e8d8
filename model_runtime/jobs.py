"""What flows between Serving and the HTTP layer: a validated, tokenized engine request (Job), the
engine requests of one API request (JobGroup), a streamed piece of output (Delta) and a finished one
(Output)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from model_runtime.logprobs_format import LogprobEntry
from model_runtime.protocol import Usage
from model_runtime.sampling import SamplingParams


@dataclass
class Job:
    """One generation request, validated and tokenized."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    separate_reasoning: bool = False
    # put in front of the output: "<think>\n" when the prompt opened the thinking and it is not separated,
    # or the prompt itself for a completion's echo
    content_prefix: str = ""
    arrival: float = field(default_factory=time.monotonic)
    index: int = 0  # the choice index before best_of picks (prompt index * best_of + i)
    logprobs: bool = False  # the answer carries log-probabilities (the engine is asked for them)


@dataclass
class JobGroup:
    """The engine requests of one API request: each prompt x best_of (n without best_of)."""

    request_id: str
    jobs: list[Job]
    n: int = 1
    best_of: int = 1
    prompt_tokens: int = 0  # each prompt counted once, however many choices it has
    top_logprobs: int | None = None  # alternatives per token in the answer; None: no logprobs in the answer

    def single(self) -> Job:
        if len(self.jobs) != 1:
            raise ValueError(f"{len(self.jobs)} engine requests, not one")
        return self.jobs[0]


@dataclass
class Delta:
    """A piece of output. The first delta of a job comes once the engine accepted it."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[LogprobEntry] = field(default_factory=list)  # the tokens since the previous delta
    completion_tokens: int = 0  # generated so far


@dataclass
class Output:
    content: str | None
    reasoning: str | None
    finish_reason: str
    usage: Usage
    index: int = 0
    logprobs: list[LogprobEntry] | None = None
    cumulative_logprob: float = 0.0  # of the generated tokens (best_of's ranking)
