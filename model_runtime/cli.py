"""`model-runtime serve ...` and `model-runtime quantize ...`: the runtime's console script.

`serve` takes exactly the flags of `python -m model_runtime` (see __main__.py); `quantize`
delegates to model_runtime.quantize_cli (SRC DST --method int4 --group-size 128).
"""

from __future__ import annotations

import sys

USAGE = """usage: model-runtime {serve,quantize} ...

commands:
  serve     serve a model over HTTP (KServe V1/V2 + OpenAI API); `model-runtime serve --help`
  quantize  write a quantized safetensors artifact; `model-runtime quantize --help`
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from model_runtime.__main__ import main as serve

        return serve(rest, prog="model-runtime serve")
    if command == "quantize":
        from model_runtime.quantize_cli import main as quantize

        return int(quantize(rest) or 0)
    print(f"model-runtime: unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
