#!/usr/bin/env python
"""In-context associative recall with a TTT-MLP layer alone (no attention, no Moshi around it).

The program is finetune/commands/probe_ttt_mlp.py, also installed as ``moshi-ttt-probe-ttt-mlp``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.probe_ttt_mlp import main

if __name__ == "__main__":
    sys.exit(main())
