"""Training data: datasets of token grids ``[1 + n_q, T]`` and a resumable, rank-sharded loader."""

from .loader import BatchPlan, ResumableLoader, eval_batches
from .synthetic import SyntheticCodes

__all__ = ["BatchPlan", "ResumableLoader", "SyntheticCodes", "eval_batches"]
