#!/usr/bin/env python
"""The cost of TTT in a whole fine-tuning step: time and peak memory, TTT vs the same model without TTT.

The program is finetune/commands/bench_model.py, also installed as ``moshi-ttt-bench-model``;
``--help`` shows its usage.
"""

from finetune.commands.bench_model import cli

if __name__ == "__main__":
    cli()
