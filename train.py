#!/usr/bin/env python
"""Fine-tune Moshi with In-Place TTT: ``python train.py CONFIG [--section.key=value ...]``.

The program is finetune/commands/train.py, also installed as ``moshi-ttt-train``; ``--help`` shows
its usage. This file stays at the repository root for ``torchrun train.py ...``.
"""

from finetune.commands.train import cli

if __name__ == "__main__":
    cli()
