#!/usr/bin/env python
"""Per-frame streaming latency of Moshi's LMGen with and without In-Place TTT layers.

The program is finetune/commands/bench_streaming.py, also installed as ``moshi-ttt-bench-streaming``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.bench_streaming import main

if __name__ == "__main__":
    sys.exit(main())
