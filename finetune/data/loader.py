"""Deterministic, rank-sharded, resumable batching.

Step ``s`` of epoch ``e`` takes the global batch ``perm_e[s*G:(s+1)*G]`` (``G = batch_size * world``,
``perm_e`` a permutation seeded by ``(seed, e)``) and rank ``r`` its ``r``-th slice, so a run with
``N`` processes sees the same global batches as one process with an ``N`` times larger batch. The
loader's state is ``(epoch, step)`` of the next batch to take, counted as batches are consumed (not
as workers prefetch), so resuming from it yields exactly the batches that would have come next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..schema import ConfigError
from ..training.distributed import all_gather_object


@dataclass
class BatchPlan:
    num_items: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the dataset has {self.num_items} items, fewer than one global batch of "
                f"{self.batch_size} x {self.world_size} processes; add data or lower batch_size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def indices(self, epoch: int, step: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.num_items, generator=g)
        else:
            perm = torch.arange(self.num_items)
        start = step * self.global_batch + self.rank * self.batch_size
        return perm[start : start + self.batch_size].tolist()


class _EpochSampler(Sampler[list[int]]):
    def __init__(self, plan: BatchPlan, epoch: int, start: int) -> None:
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.plan.batches_per_epoch):
            yield self.plan.indices(self.epoch, step)

    def __len__(self) -> int:
        return self.plan.batches_per_epoch - self.start


@dataclass
class Batch:
    codes: torch.Tensor | None  # [b, K, T]: the valid items (None if every item was bad)
    bad: list[int]  # positions in the batch of the items skipped as bad

    @property
    def skipped(self) -> int:
        return len(self.bad)


def collate_codes(items: list[torch.Tensor | None]) -> Batch:
    valid = [x for x in items if x is not None]
    return Batch(torch.stack(valid, 0) if valid else None, [i for i, x in enumerate(items) if x is None])


class ResumableLoader:
    """An endless iterator of batches with ``state_dict()`` / ``load_state_dict()``."""

    def __init__(self, dataset: Dataset, plan: BatchPlan, num_workers: int = 0) -> None:
        self.dataset, self.plan, self.num_workers = dataset, plan, num_workers
        self.epoch, self.step = 0, 0
        self.skipped_items: set[int] = set()  # dataset indices of the bad items met so far

    @property
    def skipped(self) -> int:
        """Distinct bad items this process has met (an item skipped in every epoch counts once)."""
        return len(self.skipped_items)

    def skipped_all_ranks(self) -> int:
        """Distinct bad items met by any process (a collective: every rank calls it)."""
        return len(set().union(*all_gather_object(self.skipped_items)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "num_items": self.plan.num_items,
            "skipped_items": sorted(self.skipped_items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_items", self.plan.num_items) != self.plan.num_items:
            raise ConfigError(
                f"cannot resume: the saved data position is for a dataset of {state['num_items']} items, "
                f"this one has {self.plan.num_items}; resume with the same data, or start a new run_dir"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped_items = {int(i) for i in state.get("skipped_items", [])}

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            valid_in_epoch = 0
            fresh_epoch = self.step == 0
            sampler = _EpochSampler(self.plan, self.epoch, self.step)
            loader = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=collate_codes,
                persistent_workers=False,
            )
            for batch in loader:
                if batch.bad:  # batches come in the sampler's order, so this is the batch's indices
                    indices = self.plan.indices(self.epoch, self.step)
                    self.skipped_items.update(indices[i] for i in batch.bad)
                self.step += 1
                if batch.codes is None:
                    continue
                valid_in_epoch += 1
                yield batch.codes
            if fresh_epoch and valid_in_epoch == 0:
                raise RuntimeError(
                    f"no valid item in a whole epoch of {self.plan.num_items} items: every one was skipped as "
                    "bad (see the warnings above; scripts/check_dataset.py lists every problem)"
                )
            self.epoch, self.step = self.epoch + 1, 0


def eval_plan(num_items: int, batch_size: int, rank: int, world_size: int) -> BatchPlan:
    """Unshuffled evaluation batches; a held-out set smaller than one global batch gets smaller batches."""
    if num_items < world_size:
        raise ConfigError(
            f"the evaluation set has {num_items} items, fewer than the {world_size} processes; "
            "add evaluation data or set eval.interval=0"
        )
    return BatchPlan(num_items, min(batch_size, num_items // world_size), rank, world_size, shuffle=False)


def eval_batches(dataset: Dataset, batch_size: int, num_batches: int, rank: int, world_size: int):
    """The same fixed, rank-sharded evaluation batches at every evaluation."""
    plan = eval_plan(len(dataset), batch_size, rank, world_size)
    n = min(num_batches, plan.batches_per_epoch) if num_batches > 0 else plan.batches_per_epoch
    for step in range(n):
        batch = collate_codes([dataset[i] for i in plan.indices(0, step)])
        if batch.codes is not None:
            yield batch.codes
