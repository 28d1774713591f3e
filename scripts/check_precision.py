#!/usr/bin/env python
"""Precision of In-Place TTT's update math under bf16, against a float64 reference.

The program is finetune/commands/check_precision.py, also installed as ``moshi-ttt-check-precision``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.check_precision import main

if __name__ == "__main__":
    sys.exit(main())
