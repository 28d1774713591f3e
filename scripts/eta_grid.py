#!/usr/bin/env python
"""The width x chunk x eta grid of configs/sweeps/eta_transfer.yaml: best eta per cell, and whether one.

The program is finetune/commands/eta_grid.py, also installed as ``moshi-ttt-eta-grid``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.eta_grid import main

if __name__ == "__main__":
    sys.exit(main())
