"""Model-level benchmark (all-MiniLM-L6-v2 end to end, Llama-7B MLP stack at decode sizes).

    python bench/model.py --json bench/results/model-cpu.json --markdown bench/results/model-cpu.md
    python bench/model.py --quick --model minilm

The work is in fastkern.bench.model (also reachable as ``fastkern-bench --model ...``);
this script only makes it runnable from a source checkout.
"""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastkern.bench.model import main

    sys.exit(main())
