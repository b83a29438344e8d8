"""`distillery-train -f job.yaml [--teacher PATH] [--student PATH] [--dataset PATH] [--output PATH]
[--max-steps N]`: run a DistillationJob in this process (CPU or GPU), the same code the TrainJob's pods run
(there under torchrun, one process per GPU).

job.yaml is a DistillationJob (apiVersion/kind/metadata/spec) or its bare spec. Each override replaces
a URI with a local path. An invalid job exits 2 listing every problem with its field path; a job that
fails while running exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from distillery_contract.distillation import DistillationJobSpec, spec_problems

EXIT_INVALID = 2
EXIT_FAILED = 1


class InvalidJob(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))
        self.problems = problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery-train", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", "--filename", required=True, type=Path, help="the DistillationJob (YAML or JSON)")
    p.add_argument("--teacher", type=Path, help="local teacher directory instead of spec.teacher.uri")
    p.add_argument("--student", type=Path, help="local student directory instead of spec.student.uri")
    p.add_argument("--dataset", type=Path, help="local .jsonl file instead of spec.dataset.uri")
    p.add_argument("--output", type=Path, help="local output directory instead of spec.output.uri")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int,
                   help="optimizer steps, overriding spec.training (epochs / maxSteps)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _field_path(loc: tuple[Any, ...]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def load_job(path: Path) -> DistillationJobSpec:
    """The spec in `path`, validated (field rules and spec_problems); InvalidJob lists every problem."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidJob([(str(path), f"cannot read: {exc.strerror or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise InvalidJob([(str(path), f"not YAML: {exc}")]) from exc
    if not isinstance(doc, dict):
        raise InvalidJob([(str(path), "expected a DistillationJob (a mapping with a spec)")])
    if "spec" in doc or "kind" in doc:
        if doc.get("kind", "DistillationJob") != "DistillationJob":
            raise InvalidJob([("kind", f"expected DistillationJob, got {doc.get('kind')!r}")])
        doc = doc.get("spec")
        if not isinstance(doc, dict):
            raise InvalidJob([("spec", "missing or not a mapping")])
    try:
        spec = DistillationJobSpec.model_validate(doc)
    except ValidationError as exc:
        raise InvalidJob([(_field_path(e["loc"]), e["msg"]) for e in exc.errors()]) from exc
    if problems := spec_problems(spec):
        raise InvalidJob(problems)
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        print("error: --max-steps must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    try:
        spec = load_job(args.filename)
    except InvalidJob as exc:
        print(f"error: invalid DistillationJob {args.filename}:", file=sys.stderr)
        for path, msg in exc.problems:
            print(f"  {path}: {msg}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from distillery_trainer.data import DatasetError
    from distillery_trainer.models import TokenizerMismatch
    from distillery_trainer.run import Overrides, run_job
    from distillery_trainer.storage import StorageError
    from distillery_trainer.trainer import PrecisionError

    overrides = Overrides(teacher=args.teacher, student=args.student, dataset=args.dataset, output=args.output,
                          max_steps=args.max_steps)
    try:
        result = run_job(spec, overrides, progress_bar=args.progress)
    except (DatasetError, TokenizerMismatch, StorageError, PrecisionError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.lineage is not None:
        after = result.after or {}
        print(f"wrote {result.output} after {result.steps} steps"
              + (f" (validation KL {after['kl']:.4f}, loss {after['ce']:.4f})" if after else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
