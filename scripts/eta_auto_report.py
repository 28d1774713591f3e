#!/usr/bin/env python
"""``ttt.eta: auto`` against hand-picked etas, cell by cell (configs/sweeps/eta_auto.yaml).

The program is finetune/commands/eta_auto_report.py, also installed as ``moshi-ttt-eta-auto-report``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.eta_auto_report import main

if __name__ == "__main__":
    sys.exit(main())
