#!/usr/bin/env python
"""Talk to a fine-tuned (TTT) Moshi with moshi's web UI or ``moshi.client``.

The program is finetune/commands/serve.py, also installed as ``moshi-ttt-serve``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.serve import main

if __name__ == "__main__":
    sys.exit(main())
