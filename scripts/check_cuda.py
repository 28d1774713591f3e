#!/usr/bin/env python
"""Correctness of the TTT layers on a GPU: fast forms, whole model, streaming, bf16.

The program is finetune/commands/check_cuda.py, also installed as ``moshi-ttt-check-cuda``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.check_cuda import main

if __name__ == "__main__":
    sys.exit(main())
