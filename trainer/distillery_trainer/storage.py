"""Where the job's teacher, student, dataset and output live: hf://, s3://, gs:// or pvc:// URIs -> local paths.

pvc://CLAIM/PATH is a PersistentVolumeClaim mounted into the pod at PVC_ROOT/CLAIM (the TrainJob mounts
it there), so it is a plain path. hf:// is fetched with huggingface_hub, s3:// and gs:// with fsspec (s3fs,
gcsfs); each only when that library is installed, otherwise a clear error says which one is missing.
An s3/gs download lands in the cache whole or not at all (one process per node downloads, under a file
lock; a `.partial` sibling renamed into place). An output on hf/s3/gs is written to a local staging
directory first and uploaded when complete.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distillery_contract.distillation import PVC_MOUNT_ROOT

PVC_ROOT_ENV = "DISTILLERY_PVC_ROOT"
DEFAULT_PVC_ROOT = PVC_MOUNT_ROOT  # where the operator mounts each claim (the TrainJob's pod template)
CACHE_ENV = "DISTILLERY_CACHE_DIR"


class StorageError(RuntimeError):
    """A location cannot be read or written (names the URI and why)."""


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, os.path.join(os.environ.get("TMPDIR", "/tmp"), "distillery-cache")))


def split_uri(uri: str) -> tuple[str, str]:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise StorageError(f"{uri!r} is not a URI (hf://, s3://, gs:// or pvc://)")
    return scheme, rest.strip("/")


def pvc_path(uri: str, root: Path | None = None) -> Path:
    _, rest = split_uri(uri)
    claim, _, path = rest.partition("/")
    return (root or pvc_root()) / claim / path


def fetch(uri: str, *, revision: str | None = None, root: Path | None = None, cache: Path | None = None) -> Path:
    """A local path holding what `uri` names (a model directory or a dataset file)."""
    scheme, rest = split_uri(uri)
    if scheme == "pvc":
        local = pvc_path(uri, root)
        if not local.exists():
            claim = rest.partition("/")[0]
            raise StorageError(f"{uri}: {local} does not exist (is claim {claim} mounted at "
                               f"{(root or pvc_root()) / claim}?)")
        return local
    if scheme == "hf":
        return _hf_fetch(rest, revision, cache or cache_dir())
    if scheme in ("s3", "gs"):
        dst = (cache or cache_dir()) / scheme / rest
        if not dst.exists():
            _download(_filesystem(scheme, uri), uri, dst)
        return dst
    raise StorageError(f"{uri}: unknown scheme {scheme}:// (hf, s3, gs, pvc)")


def _download(fs, uri: str, dst: Path) -> None:  # type: ignore[no-untyped-def]
    """`uri` into `dst`, whole or not at all. Every process of the node (each local rank) calls this: an
    exclusive lock lets one download while the others wait, and then find `dst` complete. The download goes
    to a sibling `.partial` path renamed into place when complete, so a killed download never passes for a
    finished one; the next holder of the lock removes its leftovers (the lock dies with its holder)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    with open(dst.with_name(f".{dst.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when the process dies
        if dst.exists():  # another process finished it while this one waited
            return
        _remove(partial)
        try:
            if fs.isdir(uri):
                fs.get(uri.rstrip("/") + "/", str(partial) + "/", recursive=True)
            else:
                fs.get(uri, str(partial))
        except Exception as exc:  # noqa: BLE001 - the backends raise their own kinds
            _remove(partial)
            raise StorageError(f"{uri}: cannot download: {exc}") from exc
        os.rename(partial, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _hf_fetch(repo: str, revision: str | None, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise StorageError(f"hf://{repo}: huggingface_hub is not installed") from exc
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache / "hf")))
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"hf://{repo}: cannot download: {exc}") from exc


def _filesystem(scheme: str, uri: str):  # type: ignore[no-untyped-def]
    try:
        import fsspec

        return fsspec.filesystem(scheme)
    except ImportError as exc:
        lib = {"s3": "s3fs", "gs": "gcsfs"}[scheme]
        raise StorageError(f"{uri}: reading and writing {scheme}:// needs fsspec and {lib} installed") from exc
    except ValueError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


@dataclass(frozen=True)
class OutputTarget:
    """Where the trainer writes the artifact (`local`), and how it reaches the URI afterwards (`publish`)."""

    local: Path
    publish: Callable[[], None] | None = None


def output_target(uri: str, *, root: Path | None = None, staging: Path | None = None) -> OutputTarget:
    scheme, rest = split_uri(uri)
    if scheme == "pvc":
        return OutputTarget(pvc_path(uri, root))
    local = (staging or cache_dir() / "output") / scheme / rest
    if scheme == "hf":
        try:
            from huggingface_hub import HfApi
        except ImportError as exc:
            raise StorageError(f"{uri}: huggingface_hub is not installed") from exc

        def publish_hf() -> None:
            HfApi().upload_folder(repo_id=rest, folder_path=str(local), ignore_patterns=["checkpoints/*"])

        return OutputTarget(local, publish_hf)
    if scheme in ("s3", "gs"):
        fs = _filesystem(scheme, uri)

        def publish_fs() -> None:
            for f in sorted(local.rglob("*")):
                rel = f.relative_to(local)
                if f.is_file() and rel.parts[0] != "checkpoints":
                    fs.put(str(f), f"{uri.rstrip('/')}/{rel.as_posix()}")

        return OutputTarget(local, publish_fs)
    raise StorageError(f"{uri}: unknown scheme {scheme}:// (hf, s3, gs, pvc)")
