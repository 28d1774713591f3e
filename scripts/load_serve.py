#!/usr/bin/env python
"""Load test of the conversation server on the loopback: many clients, few slots, every misbehaviour.

The program is finetune/commands/load_serve.py, also installed as ``moshi-ttt-load-serve``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.load_serve import main

if __name__ == "__main__":
    sys.exit(main())
