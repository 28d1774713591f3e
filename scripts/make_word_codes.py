#!/usr/bin/env python
"""Spoken symbols for the conversational-memory benchmark (``data.recall.facts: speech``).

The program is finetune/commands/make_word_codes.py, also installed as ``moshi-ttt-make-word-codes``;
``--help`` shows its usage.
"""

import sys

from finetune.commands.make_word_codes import main

if __name__ == "__main__":
    sys.exit(main())
