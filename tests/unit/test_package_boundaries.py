"""The packages' boundaries: the runtime and the operator each import only the neutral contract package
from the other's side, the operator never imports torch or kmock, and the test doubles stay out of the
production modules.

Checked twice: statically (every import statement in every module, including imports inside functions,
which a lazy import would hide from the dynamic check) and dynamically (importing every production module
of a package in a fresh interpreter and looking at what landed in sys.modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reference import REPO_ROOT

PACKAGES = {
    "distillery_contract": REPO_ROOT / "contract" / "distillery_contract",
    "distillery_operator": REPO_ROOT / "operator" / "distillery_operator",
    "model_runtime": REPO_ROOT / "model_runtime",
    "distillery_trainer": REPO_ROOT / "trainer" / "distillery_trainer",
}
TESTING_SUBPACKAGE = "distillery_operator.testing"  # test doubles, as kopf.testing; the images exclude it


def module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def production_modules(package: str) -> dict[str, Path]:
    found = {module_name(package, p): p for p in sorted(PACKAGES[package].rglob("*.py"))}
    return {name: p for name, p in found.items() if not name.startswith(TESTING_SUBPACKAGE)}


def imported_roots(path: Path, name: str) -> set[str]:
    """Top-level names of every module the file imports (relative imports resolved against `name`)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package
                roots.add(name.split(".")[0])
            elif node.module:
                roots.add(node.module.split(".")[0])
    return roots


def imports_of(package: str) -> dict[str, set[str]]:
    return {name: imported_roots(path, name) for name, path in production_modules(package).items()}


def offenders(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    return {name: roots & forbidden for name, roots in imports_of(package).items() if roots & forbidden}


def test_the_modules_are_found():
    # a wrong root would make every check below pass on nothing
    assert len(production_modules("distillery_operator")) >= 10
    assert len(production_modules("model_runtime")) >= 10
    assert {"distillery_contract.flags", "distillery_contract.values"} <= set(production_modules("distillery_contract"))
    assert "distillery_operator.testing.emulator" not in production_modules("distillery_operator")


def test_runtime_imports_nothing_from_the_operator():
    assert offenders("model_runtime", {"distillery_operator", "kopf", "kubernetes", "kmock"}) == {}


def test_operator_imports_nothing_from_the_runtime_nor_torch_nor_kmock():
    forbidden = {"model_runtime", "torch", "transformers", "kserve", "kmock", "safetensors"}
    assert offenders("distillery_operator", forbidden) == {}


def test_trainer_imports_nothing_from_the_operator():
    # the trainer image holds the trainer, the contract and (for the quantized copy) the runtime's quantizer
    assert len(production_modules("distillery_trainer")) >= 8
    assert offenders("distillery_trainer", {"distillery_operator", "kopf", "kubernetes", "kmock"}) == {}


def test_contract_imports_only_the_standard_library_and_pydantic():
    # pydantic: the DistillationJob spec is parsed by both the operator and the trainer
    stdlib = set(sys.stdlib_module_names) | {"__future__", "distillery_contract", "pydantic"}
    outside = {name: roots - stdlib for name, roots in imports_of("distillery_contract").items() if roots - stdlib}
    assert outside == {}


def test_the_evaluation_runner_needs_only_the_standard_library_and_aiohttp():
    # distillery-eval runs as a Job from the operator image: no torch, and no openai/httpx client either
    evaluation = {name: roots for name, roots in imports_of("distillery_operator").items()
                  if name.startswith("distillery_operator.evaluation")}
    assert len(evaluation) >= 5
    allowed = set(sys.stdlib_module_names) | {"__future__", "aiohttp", "distillery_operator"}
    assert {name: roots - allowed for name, roots in evaluation.items() if roots - allowed} == {}


def test_only_the_testing_subpackage_imports_kmock():
    emulator = PACKAGES["distillery_operator"] / "testing" / "emulator.py"
    # the check above is not vacuous: the emulator does import kmock, and it lives in testing/
    assert "kmock" in imported_roots(emulator, "distillery_operator.testing.emulator")
    for package in PACKAGES:
        assert offenders(package, {"kmock"}) == {}, package


def test_the_static_check_sees_a_forbidden_import(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from distillery_operator import render\n    import torch.nn as nn\n")
    assert imported_roots(bad, "model_runtime.bad") == {"distillery_operator", "torch"}


IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded_roots(modules: list[str]) -> set[str]:
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(modules)], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT, timeout=300)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("package,forbidden", [
    ("distillery_operator", {"model_runtime", "torch", "kmock", "transformers", "kserve"}),
    ("distillery_contract", {"distillery_operator", "model_runtime", "torch", "kopf", "kubernetes"}),
])
def test_importing_every_module_loads_nothing_forbidden(package: str, forbidden: set[str]):
    loaded = loaded_roots(sorted(production_modules(package)))
    assert package in loaded
    assert loaded & forbidden == set()


def test_importing_the_runtime_loads_no_operator_code():
    # the serving entry point and the quantize CLI: everything the runtime image runs
    loaded = loaded_roots(["model_runtime.__main__", "model_runtime.quantize_cli", "model_runtime.cli"])
    assert {"model_runtime", "distillery_contract", "torch"} <= loaded
    assert loaded & {"distillery_operator", "kopf", "kmock"} == set()


def test_importing_the_trainer_loads_no_operator_code():
    # every module but __main__ (which runs the CLI when imported)
    modules = sorted(m for m in production_modules("distillery_trainer") if not m.endswith("__main__"))
    loaded = loaded_roots(modules)
    assert {"distillery_trainer", "distillery_contract", "torch", "transformers"} <= loaded
    assert loaded & {"distillery_operator", "kopf", "kmock", "kubernetes"} == set()
