"""A clone works with nothing beside it: no tracked file reads the read-only folder that sat next to
the first checkouts, and what the tests read from third parties is in the repository with its licence."""

from __future__ import annotations

import subprocess

from tests.reference import KSERVE_REFERENCE, R1_TOKENIZER_DIR, REFERENCE_DIR, REPO_ROOT, TRAINER_REFERENCE

# Spelled in pieces so this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "shared" + "/reference", "shared" + "/notes", "shared" + " notes")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def test_no_tracked_file_points_outside_the_repository():
    hits = []
    for rel in tracked_files():
        path = REPO_ROOT / rel
        if not path.is_file() or path.stat().st_size > 4 << 20:  # large data: CRD schemas, the tokenizer
            continue
        text = path.read_text(errors="replace")
        hits += [f"{rel}: {needle}" for needle in OUTSIDE_PATHS if needle in text]
    assert hits == []


def test_the_check_finds_such_a_reference():
    line = 'TOKENIZER = Path("' + ".." + "/" + "shared" + '/reference/tokenizer")'
    assert any(needle in line for needle in OUTSIDE_PATHS)


def test_reference_data_is_in_the_repository_with_its_licence():
    for folder in (KSERVE_REFERENCE, TRAINER_REFERENCE, R1_TOKENIZER_DIR, REFERENCE_DIR / "prometheus-operator"):
        assert folder.is_dir(), folder
        assert any(p.name.startswith("LICENSE") for p in folder.iterdir()), f"{folder} has no licence file"
        assert folder.name in (REFERENCE_DIR / "README.md").read_text(), f"{folder.name}: where it comes from"
    assert (R1_TOKENIZER_DIR / "tokenizer.json").stat().st_size > 1 << 20
    assert (KSERVE_REFERENCE / "serving.kserve.io_inferenceservices.yaml").is_file()
