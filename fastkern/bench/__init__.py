"""The benchmark harness (DESIGN.md §5): ``fastkern-bench`` and the library under it.

- ``shapes``:   the cases (op, N, K, M, dtype) - full, quick and custom sets
- ``inputs``:   one random weight per (N, K), turned into each op's format by fastkern.formats
- ``peers``:    what PyTorch already offers, built from the same weight
- ``ceilings``: the machine's read bandwidth and peak matmul, measured in the same run
- ``timing``:   medians after warm-up, rotating weight copies larger than the last-level cache
- ``runner``:   the run itself -> a JSON-ready dict
- ``report``:   table, JSON, comparison; ``plot``: PNG charts
- ``cli``:      the command line

The pytest-benchmark suite in ``bench/`` builds its inputs with the same functions.
"""
from fastkern.bench.shapes import Case, custom_cases, full_cases, quick_cases
from fastkern.bench.runner import RunConfig, run_benchmark

__all__ = ["Case", "custom_cases", "full_cases", "quick_cases", "RunConfig", "run_benchmark"]
