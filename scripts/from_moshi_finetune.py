#!/usr/bin/env python
"""Turn a kyutai-labs/moshi-finetune YAML into this project's training config, with TTT added.

The program is finetune/commands/from_moshi_finetune.py, also installed as ``moshi-ttt-from-moshi-finetune``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.from_moshi_finetune import main

if __name__ == "__main__":
    sys.exit(main())
