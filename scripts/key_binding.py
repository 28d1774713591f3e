#!/usr/bin/env python
"""Do a model's MLP keys say *which* fact is asked? A diagnostic for the conversational-memory benchmark.

The program is finetune/commands/key_binding.py, also installed as ``moshi-ttt-key-binding``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.key_binding import main

if __name__ == "__main__":
    sys.exit(main())
