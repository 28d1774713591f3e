#!/usr/bin/env python
"""GPU memory of the Moshi-7B recipes at batch 1 with gradient checkpointing.

The program is finetune/commands/memory_7b.py, also installed as ``moshi-ttt-memory-7b``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.memory_7b import main

if __name__ == "__main__":
    sys.exit(main())
