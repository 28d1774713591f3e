#!/usr/bin/env python
"""Per-frame cost of the conversation server's batch step, by number of slots.

The program is finetune/commands/bench_serve.py, also installed as ``moshi-ttt-bench-serve``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.bench_serve import main

if __name__ == "__main__":
    sys.exit(main())
