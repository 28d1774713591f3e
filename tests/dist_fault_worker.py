"""train.py with one fault on one rank, for tests/test_dist_faults.py (run by path, one process per rank).

``MOSHI_TTT_FAULT=KIND:RANK:N`` (nothing else changes; the other ranks run train.py as it is):

- ``kill-step``: SIGKILL in the middle of the N-th optimisation step (after the forward, before the
  backward and its gradient all-reduce);
- ``kill-save``: SIGKILL while checkpoint step N is being written, just before this rank writes its
  own file (``rng/rank_R.pt``), while rank 0 writes the rest;
- ``hang-step``: SIGSTOP in the middle of the N-th step: the process stays, silent (a hung process,
  or a machine lost without closing its connections);
- ``bad-item``: the N-th data item this rank reads has one codebook too few: the model raises on it;
- ``slow-save``: alive but slow: this rank sleeps N seconds while the first checkpoint is written.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

kind, rank, n = os.environ["MOSHI_TTT_FAULT"].split(":")
n = int(n)
calls = [0]


def fault(what: str) -> None:
    print(f"FAULT rank {rank}: {what}", flush=True)


if int(os.environ.get("RANK", "0")) == int(rank):
    if kind in ("kill-step", "hang-step"):
        import finetune.trainer as T

        real_loss = T.training_loss

        def loss_then_fault(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                fault(f"{kind} in step {n}")
                os.kill(os.getpid(), signal.SIGKILL if kind == "kill-step" else signal.SIGSTOP)
            return real_loss(*args, **kwargs)

        T.training_loss = loss_then_fault
    elif kind == "kill-save":
        import finetune.checkpointing as C

        real_save = C.torch.save

        def save_or_die(obj, f, *args, **kwargs):
            if f"step_{n:06d}" in str(f) and "rng" in str(f):
                fault(f"killed while checkpoint step {n} is written")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        C.torch.save = save_or_die
    elif kind == "bad-item":
        from finetune.data.synthetic import SyntheticCodes

        real_item = SyntheticCodes.__getitem__

        def item(self, index):
            codes = real_item(self, index)
            calls[0] += 1
            if calls[0] == n:
                fault(f"bad item {index}")
                return codes[:-1]
            return codes

        SyntheticCodes.__getitem__ = item
    elif kind == "slow-save":
        import time

        import finetune.checkpointing as C

        real_save = C.torch.save

        def save_slowly(obj, f, *args, **kwargs):
            if "rng" in str(f) and not calls[0]:
                calls[0] += 1
                fault(f"sleeping {n} s in the first save")
                time.sleep(n)
            return real_save(obj, f, *args, **kwargs)

        C.torch.save = save_slowly
    else:
        raise SystemExit(f"unknown fault {kind}")

os.chdir(ROOT)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
