"""`distillery-eval`: score a model behind an OpenAI-compatible endpoint on a JSONL benchmark.

    distillery-eval --endpoint http://host:8080 --model NAME --dataset evals.jsonl --scorer boxed \\
        --limit 200 --repeats 3 [--min-score 0.6] [--output result.json]

stdout gets one JSON line per answer, then a human summary, then the compact JSON result; --output gets
the compact result alone (the operator's Job passes --output /dev/termination-log, read back from the
pod's status, hence the 4 KiB bound). Exit 0 when the evaluation ran — `passed: false` says a score below
--min-score — and 1 with a message when it could not (bad dataset, endpoint unreachable after retries).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .dataset import DatasetError, load_dataset
from .result import EvalResult
from .runner import EvalConfig, EvalError, Runner, item_json
from .scorers import SCORERS

PROG = "distillery-eval"
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--endpoint", required=True,
                        help="base URL of the OpenAI-compatible API (…/v1 optional)")
    parser.add_argument("--model", required=True, help="the model name to ask for")
    parser.add_argument("--dataset", required=True, help='JSONL: {"prompt" or "messages", "answer"} per line')
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="boxed")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="the first N examples (default all)")
    parser.add_argument("--repeats", type=_positive_int, default=1,
                        help="runs over the examples (mean and std)")
    parser.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight at most")
    parser.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds per request")
    parser.add_argument("--max-tokens", type=_positive_int, default=None,
                        help="per answer (default: the server's)")
    parser.add_argument("--retries", type=int, choices=range(0, 11), default=2, metavar="0..10",
                        help="extra attempts after a connection failure, 5xx or 429")
    parser.add_argument("--min-score", type=_fraction, default=None, help="passed: mean score >= this")
    parser.add_argument("--output", default=None, help="write the compact JSON result here")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding a bearer token (sent only when set)")
    return parser


def command(endpoint: str, model: str, dataset: str, *, scorer: str = "boxed", limit: int | None = None,
            repeats: int = 1, min_score: float | None = None, max_tokens: int | None = None,
            concurrency: int | None = None, timeout_s: float | None = None,
            output: str | None = TERMINATION_LOG) -> list[str]:
    """The command line of an evaluation Job (what the operator renders), in this parser's own flags."""
    args = [PROG, "--endpoint", endpoint, "--model", model, "--dataset", dataset, "--scorer", scorer,
            "--repeats", str(repeats)]
    optional = {"--limit": limit, "--min-score": min_score, "--max-tokens": max_tokens,
                "--concurrency": concurrency, "--timeout": timeout_s, "--output": output}
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    return args


def summary_line(result: EvalResult) -> str:
    lat = result.latency_s
    verdict = ("" if result.passed is None
               else " PASSED" if result.passed else f" FAILED (min {result.min_score})")
    latency = " ".join(f"{k} {v:.3f}s" if v is not None else f"{k} -" for k, v in lat.items())
    scores = ", ".join(f"{s:.3f}" for s in result.scores)
    return (f"{result.model} on {result.examples} examples x {result.repeats} repeats ({result.scorer}): "
            f"score {result.score:.4f} ± {result.score_std:.4f} [{scores}]; latency {latency}; "
            f"{result.errors}/{result.requests} requests failed{verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        examples = load_dataset(args.dataset, args.limit)
        if args.output and not Path(args.output).parent.is_dir():
            raise EvalError(f"cannot write {args.output}: its directory does not exist")
        config = EvalConfig(
            endpoint=args.endpoint, model=args.model, scorer=args.scorer, repeats=args.repeats,
            concurrency=args.concurrency, timeout_s=args.timeout, max_tokens=args.max_tokens,
            retries=args.retries, api_key=os.environ.get(args.api_key_env) or None,
        )
        result = asyncio.run(Runner(config, on_item=lambda item: print(item_json(item), flush=True))
                             .run(examples, args.min_score))
        compact = result.to_json()
        if args.output:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(compact)
    except (DatasetError, EvalError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(summary_line(result), flush=True)
    print(compact, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
