#!/usr/bin/env python
"""Loss by position and recall by distance for one or more runs, TTT and baselines side by side.

The program is finetune/commands/eval_long_context.py, also installed as ``moshi-ttt-eval-long-context``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.eval_long_context import main

if __name__ == "__main__":
    sys.exit(main())
