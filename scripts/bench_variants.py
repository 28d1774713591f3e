#!/usr/bin/env python
"""Training cost of the TTT variants and the no-TTT baseline, measured the same way.

The program is finetune/commands/bench_variants.py, also installed as ``moshi-ttt-bench-variants``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.bench_variants import main

if __name__ == "__main__":
    sys.exit(main())
