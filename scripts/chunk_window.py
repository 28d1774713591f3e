#!/usr/bin/env python
"""Chunk size against the attention window: when far recall leaves the half-right plateau.

The program is finetune/commands/chunk_window.py, also installed as ``moshi-ttt-chunk-window``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.chunk_window import main

if __name__ == "__main__":
    sys.exit(main())
