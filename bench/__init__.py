"""Distillery benchmarks (`make bench`): our runtime against transformers and llama.cpp on one machine.

`python -m bench.run` drives every engine in its own subprocess (so peak RSS is measured per engine
and a crash is recorded, not fatal), writes bench/results/results.json and prints a table.
Pure helpers (percentiles, bandwidth-bound arithmetic, the report table) are unit-tested in
tests/unit/bench/; nothing in this package is imported by the runtime or the operator.
"""
