#!/usr/bin/env python
"""Benchmark one TTT gating against Moshi's plain gating and the per-chunk-weight form.

The program is finetune/commands/bench_ttt.py, also installed as ``moshi-ttt-bench-ttt``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.bench_ttt import main

if __name__ == "__main__":
    sys.exit(main())
