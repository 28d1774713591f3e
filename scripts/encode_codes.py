#!/usr/bin/env python
"""Encode a dataset's audio with Mimi once, into the code cache training reads.

The program is finetune/commands/encode_codes.py, also installed as ``moshi-ttt-encode-codes``;
``--help`` shows its usage.
"""

from finetune.commands.encode_codes import cli

if __name__ == "__main__":
    cli()
