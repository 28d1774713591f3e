#!/usr/bin/env python
"""Talk to a fine-tuned (TTT) Moshi with moshi's web UI or ``moshi.client``.

    python scripts/serve.py runs/tiny                       # web UI at http://localhost:8998
    python scripts/serve.py runs/my_run --batch-size 8 --host 0.0.0.0
    python -m moshi.client --host localhost --port 8998     # another terminal: talk from the command line

RUN_OR_CHECKPOINT is a run directory (its newest checkpoint) or a checkpoint directory; the model,
its tokenizer and its Mimi are loaded as ``scripts/infer.py`` loads them. ``--batch-size`` conversations
are served at once, each with its own fast weights (reset when a conversation starts); see
``finetune/serve.py`` for the slot model and ``--help`` for the options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
