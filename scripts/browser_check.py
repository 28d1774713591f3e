#!/usr/bin/env python
"""Moshi's own web UI, served by this project, in a real (headless) Chromium, end to end.

The program is finetune/commands/browser_check.py, also installed as ``moshi-ttt-browser-check``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.browser_check import main

if __name__ == "__main__":
    sys.exit(main())
