#!/usr/bin/env python
"""Choose the TTT learning rate before a long run: per TTT layer, the TTT term relative to the base.

The program is finetune/commands/probe_eta.py, also installed as ``moshi-ttt-probe-eta``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.probe_eta import main

if __name__ == "__main__":
    sys.exit(main())
