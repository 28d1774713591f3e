"""Fine-tuning machinery for Moshi with TTT layers (the library itself is :mod:`moshi_ttt`).

Rooms: ``training/`` (the loop and what it needs), ``serving/`` (inference and the conversation
server), ``research/`` (long-context evaluation, sweeps, the eta probe), ``compat/`` (coming from
moshi-finetune), ``data/``, ``commands/`` (the command-line programs); the config schema
(:mod:`.args`, :mod:`.schema`, :mod:`.preflight`) and :mod:`.cli` at the top.

Importing it imports :mod:`moshi_ttt` first, which sets moshi's CPU compile switch before moshi loads.
"""

from moshi_ttt.deprecation import alias_modules

# Old module -> its new place (issue 24). The old names import with a DeprecationWarning until the
# next release; this table is the changelog of the move.
MOVED_MODULES = {
    "finetune.trainer": "finetune.training.trainer",
    "finetune.model": "finetune.training.model",
    "finetune.loss": "finetune.training.loss",
    "finetune.optim": "finetune.training.optim",
    "finetune.evaluation": "finetune.training.evaluation",
    "finetune.checkpointing": "finetune.training.checkpointing",
    "finetune.monitoring": "finetune.training.monitoring",
    "finetune.distributed": "finetune.training.distributed",
    "finetune.fsdp": "finetune.training.fsdp",
    "finetune.inference": "finetune.serving.inference",
    "finetune.serve": "finetune.serving.server",
    "finetune.longeval": "finetune.research.long_context",
    "finetune.sweep": "finetune.research.sweep",
    "finetune.probe": "finetune.research.eta_probe",
    "finetune.mf_compat": "finetune.compat",
}

alias_modules(MOVED_MODULES)
