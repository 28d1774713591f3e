#!/usr/bin/env python
"""Write word alignments (``x.json`` next to each ``x.wav``) with a speech recognizer.

The program is finetune/commands/annotate.py, also installed as ``moshi-ttt-annotate``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.annotate import main

if __name__ == "__main__":
    sys.exit(main())
