#!/usr/bin/env python
"""Write a small conversation dataset in the real (moshi-finetune) format, with everything to use it.

The program is finetune/commands/make_tiny_dataset.py, also installed as ``moshi-ttt-make-tiny-dataset``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.make_tiny_dataset import main

if __name__ == "__main__":
    sys.exit(main())
