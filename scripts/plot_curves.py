#!/usr/bin/env python
"""Learning curves of logged metrics for several runs, side by side (from each run's metrics.jsonl).

The program is finetune/commands/plot_curves.py, also installed as ``moshi-ttt-plot-curves``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.plot_curves import main

if __name__ == "__main__":
    sys.exit(main())
