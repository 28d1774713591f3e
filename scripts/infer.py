#!/usr/bin/env python
"""Stream conversations through a fine-tuned (TTT) Moshi and write what it says.

The program is finetune/commands/infer.py, also installed as ``moshi-ttt-infer``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
