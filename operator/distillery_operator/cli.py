"""`distillery`: render, validate and generate the CRD with the same pure functions the operator uses, or run it.

    distillery render -f dm.yaml [--namespace NS]   # the InferenceService YAML (GitOps / dry-run path)
    distillery render -f job.yaml                   # a DistillationJob: the Kubeflow Trainer TrainJob YAML
    distillery validate -f dm.yaml                  # exit 0, or 1 with every problem listed
    distillery crd [--kind DistillationJob]         # the DistilledModel (or DistillationJob) CRD YAML
    distillery run [--namespace NS ... | --all-namespaces] [--standalone]

`-f -` reads standard input; a file may hold several YAML documents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from . import constants
from .api import InvalidSpec, Problem, parse_distilled_model
from .crd import build_crd, build_distillation_crd
from .distillation_api import DistillationJob, parse_distillation_job
from .distillation_render import render_train_job
from .render import render_inference_service
from .settings import OperatorSettings

EXIT_INVALID = 1
EXIT_USAGE = 2


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings kept readable."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(documents: list[dict[str, Any]], out: TextIO) -> None:
    yaml.dump_all(documents, out, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def load_documents(path: str) -> list[tuple[str, Any]]:
    """(label, document) pairs from a YAML file or stdin; a YAML syntax error becomes InvalidSpec."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise InvalidSpec([Problem(path, f"not valid YAML: {error}")]) from None
    if not docs:
        raise InvalidSpec([Problem(path, "no YAML documents found")])
    labelled = []
    for index, doc in enumerate(docs):
        name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
        labelled.append((f"{path}#{index}" + (f" ({name})" if name else ""), doc))
    return labelled


def _check(doc: Any, label: str, namespace: str | None) -> Any:
    if not isinstance(doc, dict):
        raise InvalidSpec([Problem(label, "is not a YAML mapping")])
    if namespace:
        doc = {**doc, "metadata": {**(doc.get("metadata") or {}), "namespace": namespace}}
    if doc.get("kind") == constants.DJ_KIND:
        return parse_distillation_job(doc)
    return parse_distilled_model(doc)


def cmd_render(args: argparse.Namespace) -> int:
    settings = OperatorSettings().render_settings()
    rendered, failed = [], False
    for label, doc in load_documents(args.file):
        try:
            obj = _check(doc, label, args.namespace)
            if isinstance(obj, DistillationJob):
                rendered.append(render_train_job(obj, settings))
            else:
                rendered.append(render_inference_service(obj, settings))
        except InvalidSpec as error:
            failed = True
            _report(label, error.problems)
    if failed:
        return EXIT_INVALID
    dump_yaml(rendered, sys.stdout)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for label, doc in load_documents(args.file):
        try:
            _check(doc, label, args.namespace)
            print(f"{label}: valid")
        except InvalidSpec as error:
            failed = True
            _report(label, error.problems)
    return EXIT_INVALID if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    dump_yaml([build_distillation_crd() if args.kind == constants.DJ_KIND else build_crd()], sys.stdout)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_operator  # kopf is imported only when the operator really runs

    settings = OperatorSettings()
    run_operator(settings, namespaces=args.namespace or None, all_namespaces=args.all_namespaces,
                 standalone=args.standalone)
    return 0


def _report(label: str, problems: list[Problem]) -> None:
    print(f"{label}: invalid ({len(problems)} problem{'s' if len(problems) != 1 else ''})", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description="Distillery: distilled LLMs on KServe")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, text in (
        ("render", cmd_render, "print what a file's DistilledModels (InferenceServices) and DistillationJobs "
                               "(TrainJobs) render to"),
        ("validate", cmd_validate, "check DistilledModel / DistillationJob file(s); exit 1 listing every problem"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-f", "--file", required=True,
                       help="YAML file with DistilledModel(s) / DistillationJob(s), or - for stdin")
        p.add_argument("-n", "--namespace", help="namespace to render into (default: the object's, else default)")
        p.set_defaults(func=func)

    p = sub.add_parser("crd", help="print a CRD generated from the API models")
    p.add_argument("--kind", choices=(constants.KIND, constants.DJ_KIND), default=constants.KIND,
                   help="which resource's CRD (default DistilledModel)")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("run", help="run the operator")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="namespace to watch (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch all namespaces")
    p.add_argument("--standalone", action="store_true", help="no peering/leader election (single replica)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FileNotFoundError as error:
        print(f"distillery: {error.filename}: no such file", file=sys.stderr)
        return EXIT_USAGE
    except InvalidSpec as error:
        _report(getattr(args, "file", "input"), error.problems)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
