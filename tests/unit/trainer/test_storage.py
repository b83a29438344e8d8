"""The s3/gs download cache is whole or absent: an interrupted download leaves nothing that passes for the
model (the next call downloads it again), the leftovers of a killed one are cleared, and the processes of a
node (one per local rank, all calling fetch) download once and never see a half-written directory.
fsspec's in-memory filesystem stands in for s3fs: no network."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distillery_trainer import storage

URI = "s3://bucket/models/student"
FILES = {"config.json": b"{}", "model.safetensors": b"weights" * 1000}


@pytest.fixture
def memory(monkeypatch) -> Iterator:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.store.clear()
    monkeypatch.setattr(fsspec, "filesystem", lambda scheme: fs)
    for name, content in FILES.items():
        fs.pipe(f"{URI}/{name}", content)
    yield fs
    fs.store.clear()


def contents(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in path.iterdir()}


def test_an_interrupted_download_leaves_nothing_and_the_next_call_completes_it(memory, monkeypatch,
                                                                                 tmp_path: Path):
    real_get_file = memory.get_file
    calls = []

    def dies_in_the_weights(rpath, lpath, **kwargs):
        calls.append(rpath)
        if rpath.endswith("model.safetensors"):  # config.json is there, the weights half-written
            Path(lpath).write_bytes(FILES["model.safetensors"][:100])
            raise ConnectionError("connection reset")
        return real_get_file(rpath, lpath, **kwargs)

    monkeypatch.setattr(memory, "get_file", dies_in_the_weights)
    with pytest.raises(storage.StorageError, match="s3://bucket/models/student: cannot download"):
        storage.fetch(URI, cache=tmp_path)
    dst = tmp_path / "s3" / "bucket" / "models" / "student"
    assert any(c.endswith("config.json") for c in calls) and not dst.exists()
    monkeypatch.setattr(memory, "get_file", real_get_file)
    assert storage.fetch(URI, cache=tmp_path) == dst
    assert contents(dst) == FILES
    assert sorted(p.name for p in dst.parent.iterdir() if not p.name.endswith(".lock")) == ["student"]


def test_the_leftovers_of_a_killed_download_are_cleared(memory, tmp_path: Path):
    leftover = tmp_path / "s3" / "bucket" / "models" / ".student.partial"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"wei")  # half a file, and one no longer in the bucket
    (leftover / "stale.bin").write_bytes(b"x")
    dst = storage.fetch(URI, cache=tmp_path)
    assert contents(dst) == FILES and not leftover.exists()


def test_a_single_file_is_downloaded_whole(memory, tmp_path: Path):
    memory.pipe("s3://bucket/data/support.jsonl", b'{"text": "hi"}\n')
    dst = storage.fetch("s3://bucket/data/support.jsonl", cache=tmp_path)
    assert dst.read_bytes() == b'{"text": "hi"}\n' and not dst.with_name(".support.jsonl.partial").exists()


def test_the_local_ranks_download_once_and_see_only_the_whole_model(memory, monkeypatch, tmp_path: Path):
    real_get_file = memory.get_file
    downloads = []

    def slow(rpath, lpath, **kwargs):
        downloads.append(rpath)
        time.sleep(0.2)  # the others reach fetch while this file is half-way
        return real_get_file(rpath, lpath, **kwargs)

    monkeypatch.setattr(memory, "get_file", slow)
    seen: list[dict[str, bytes]] = []

    def rank() -> None:
        seen.append(contents(storage.fetch(URI, cache=tmp_path)))

    ranks = [threading.Thread(target=rank) for _ in range(3)]
    for t in ranks:
        t.start()
        time.sleep(0.05)
    for t in ranks:
        t.join(timeout=30)
    assert seen == [FILES] * 3
    assert sorted(d.rsplit("/", 1)[-1] for d in downloads if d != URI) == sorted(FILES)  # once, not per rank
