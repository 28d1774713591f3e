#!/usr/bin/env python
"""Train one point of a sweep in its own run directory: the program of the wandb sweeps that.

The program is finetune/commands/sweep_point.py, also installed as ``moshi-ttt-sweep-point``;
``--help`` shows its usage.
"""

from finetune.commands.sweep_point import cli

if __name__ == "__main__":
    cli()
