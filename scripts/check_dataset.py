#!/usr/bin/env python
"""Report every problem of a moshi-finetune dataset before training; exit code 0 only when clean.

The program is finetune/commands/check_dataset.py, also installed as ``moshi-ttt-check-dataset``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.check_dataset import main

if __name__ == "__main__":
    sys.exit(main())
