"""The training loop (:mod:`.trainer`) and what it is made of: model building and parameter groups
(:mod:`.model`), the loss, the optimizer and schedules, evaluation, checkpoints and resume,
monitoring, and distributed training (DDP, FSDP2)."""
