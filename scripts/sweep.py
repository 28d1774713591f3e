#!/usr/bin/env python
"""Run a grid of training settings, then collect the results into a table and a plot.

The program is finetune/commands/sweep.py, also installed as ``moshi-ttt-sweep``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
