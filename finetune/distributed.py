"""Process group set-up for torchrun (NCCL on GPU, gloo on CPU), small collective helpers, the
watch that ends a run whose process died or hangs (:class:`PeerWatch`), and the model's DDP / FSDP
wrapping and mixed precision.

One process (plain ``python train.py``) needs no torchrun and no process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto", timeout_sec: float = 600.0) -> DistInfo:
    """This process's rank and device; joins the process group when launched with several processes.

    ``timeout_sec`` (``distributed.timeout_sec``) bounds every collective: the group's timeout is
    :func:`collective_timeout` of it (a few heartbeats longer, so that :class:`PeerWatch`, which
    names the rank at fault, speaks first)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was requested but no GPU is visible; use device: cpu or auto")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=dev if dev.type == "cuda" else None,
            timeout=collective_timeout(timeout_sec),
        )
    return DistInfo(rank, world, local_rank, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- a process that dies or hangs


class PeerFailure(RuntimeError):
    """Another process of the run failed or was lost; the message names its rank."""


_phase = "starting"


def set_phase(text: str) -> None:
    """What this process is doing (``step 12``, ``saving checkpoint step 12``), shown by the other
    ranks when they wait for it too long."""
    global _phase
    _phase = text


def heartbeat_interval(timeout_sec: float) -> float:
    """Seconds between two heartbeats of :class:`PeerWatch`: a tenth of the timeout, within [0.5, 5]."""
    return min(5.0, max(0.5, timeout_sec / 10))


def collective_timeout(timeout_sec: float) -> timedelta:
    """The process group's timeout: ``timeout_sec`` plus three heartbeats, so that on a lost process
    :class:`PeerWatch` names the rank before the backend's own timeout (which names none) fires."""
    return timedelta(seconds=timeout_sec + 3 * heartbeat_interval(timeout_sec))


_COMMS_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out")


def is_comms_error(e: BaseException) -> bool:
    """A failed collective or store call (another process is gone or late), as opposed to an error of
    this process's own."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COMMS_WORDS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]


class PeerWatch:
    """Heartbeats through the rendezvous store, so that a process of the run that dies or hangs is
    named, and no other process waits for it forever (``distributed.timeout_sec``).

    Why more than a collective timeout. A process that is killed (SIGKILL, the OOM killer, a crash)
    closes its sockets: on gloo the others' next collective fails at once, but with "Connection reset
    by peer [address]", which names no rank, and NCCL may notice nothing before its own timeout. A
    process that hangs, or a machine lost without closing its connections, is noticed by no backend
    before the group's timeout (torch's defaults: 30 min on gloo, 10 min on NCCL), whose message names
    no rank either; torchrun watches only the processes of its own machine, and only their exit. So
    every process runs two daemon threads beside training:

    - the beat thread adds 1 to its counter ``hb/<rank>`` in the c10d store that every launch has
      (torchrun's agent hosts it, or rank 0 in a plain ``env://`` launch), publishes what its process
      is doing (:func:`set_phase`), and reads the other ranks' counters and failure reports. It is the
      only thread that talks to the store, because a store call to a host that hangs never returns
      (measured: TCPStore's timeout does not bound ``add``), and after the first failed call it stops;
    - the judge thread (no I/O) ends its process when another rank's counter has not moved for
      ``timeout_sec``, or the store has not answered for that long: one ``error:`` line on stderr
      naming the rank, exit status 1. The main thread is then stuck in a collective, which Python
      cannot interrupt, hence ``os._exit``.

    When a collective fails in the main thread (gloo's immediate error on a dead peer, or the group's
    timeout), :meth:`on_error` names the rank at fault: the first failure another rank reported, else a
    rank whose heartbeat stopped, else the store's host. A process failing with an error of its own
    posts it before it exits, so the others end with that rank's error, not a bare network error.

    Nothing here depends on the backend, so it works alike on gloo and NCCL; the group's timeout is a
    few heartbeats longer (:func:`collective_timeout`), so on a hung peer this watch speaks before
    NCCL's watchdog aborts the process. ``timeout_sec`` must exceed the longest time a healthy run
    keeps one rank waiting for another (rank 0 writing a checkpoint while the others wait at the
    barrier): collectives give up after it too.
    """

    def __init__(self, rank: int, world_size: int, timeout_sec: float) -> None:
        self.rank, self.timeout = rank, timeout_sec
        self.interval = heartbeat_interval(timeout_sec)
        self.peers = [r for r in range(world_size) if r != rank]
        # torchrun's restarts (--max-restarts) share the agent's store: keep each attempt's keys apart.
        self.prefix = f"moshi_ttt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
        self.store_where = f"{host}:{port}"
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        self.store_host = "torchrun's agent on the first machine" if agent else "rank 0"
        # A connection of its own: the main thread's store calls never wait behind a heartbeat.
        self._store = dist.TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=max(30.0, timeout_sec))
        )
        now = time.monotonic()
        self._lock = threading.Lock()
        self.beats = {r: 0 for r in self.peers}
        self.moved = {r: now for r in self.peers}  # when each peer's counter last moved (local clock)
        self.phases: dict[int, str] = {}
        self.done: set[int] = set()  # peers that finished normally
        self.reports: list[tuple[int, str]] = []  # (rank, error), in the order they were posted
        self.store_ok, self.store_error = now, None
        self._to_post: list[str] = []
        self._posted, self._wake, self._finishing = threading.Event(), threading.Event(), threading.Event()
        self._claimed = False
        self._beat = threading.Thread(target=self._beat_loop, name="moshi-ttt-heartbeat", daemon=True)
        self._judge = threading.Thread(target=self._judge_loop, name="moshi-ttt-watch", daemon=True)
        self._beat.start()
        self._judge.start()

    # ------------------------------------------------------------ the two threads

    def _beat_loop(self) -> None:
        p, store, published, seen = self.prefix, self._store, None, 0
        while True:
            finishing = self._finishing.is_set()
            try:
                with self._lock:
                    posts, self._to_post = self._to_post, []
                for text in posts:
                    n = store.add(p + "failures", 1)
                    store.set(p + f"failed/{n}", f"{self.rank}\n{text}")
                if posts:
                    self._posted.set()
                if finishing:
                    store.add(p + f"done/{self.rank}", 1)
                    return
                store.add(p + f"hb/{self.rank}", 1)
                if _phase != published:
                    published = _phase
                    store.set(p + f"phase/{self.rank}", published)
                beats = {r: store.add(p + f"hb/{r}", 0) for r in self.peers}
                done = {r for r in self.peers if store.add(p + f"done/{r}", 0) > 0}
                phases = {
                    r: store.get(p + f"phase/{r}").decode()
                    for r in self.peers
                    if store.check([p + f"phase/{r}"])
                }
                new = []
                for i in range(seen + 1, store.add(p + "failures", 0) + 1):
                    if not store.check([p + f"failed/{i}"]):
                        break
                    who, _, text = store.get(p + f"failed/{i}").decode().partition("\n")
                    new.append((int(who), text))
                    seen = i
            except Exception as e:  # the store's host is gone: say so once, and stop calling it
                with self._lock:
                    self.store_error = _first_line(e)
                return
            now = time.monotonic()
            with self._lock:
                for r, b in beats.items():
                    if b != self.beats[r]:
                        self.beats[r], self.moved[r] = b, now
                self.done |= done
                self.phases.update(phases)
                self.reports += new
                self.store_ok = now
            self._wake.wait(self.interval)
            self._wake.clear()

    def _judge_loop(self) -> None:
        while not self._finishing.wait(min(1.0, self.interval)):
            why = self._verdict(self.timeout)
            if why is not None and self._claim():
                sys.stdout.flush()
                sys.stderr.write(f"error: {why}{self._after()}\n")
                sys.stderr.flush()
                os._exit(1)

    # ------------------------------------------------------------ verdicts

    def _verdict(self, silence: float) -> str | None:
        """Who is lost, if the store or a peer has been silent for more than ``silence`` seconds."""
        now = time.monotonic()
        with self._lock:
            store_silent = now - self.store_ok
            lost = sorted((now - self.moved[r], r) for r in self.peers if r not in self.done)
            phases, store_error = dict(self.phases), self.store_error
        host_done = self.store_host == "rank 0" and 0 in self.done  # its store left with it, normally
        if store_silent > silence and not host_done:
            return (
                f"lost contact with the rendezvous store at {self.store_where} for {store_silent:.0f} s "
                f"({store_error or 'no answer'}): its host, {self.store_host}, was killed, crashed or hangs, "
                "or its machine is gone"
            )
        if lost and lost[-1][0] > silence:
            age, r = lost[-1]  # silent the longest: the first to go
            seen = f", last seen at {phases[r]!r}" if r in phases else ""
            return (
                f"rank {r} was lost: no sign of life for {age:.0f} s (killed, crashed or hung, or its "
                f"machine is gone){seen}"
            )
        return None

    def _after(self, fix: str = "launch the same command again") -> str:
        return f"; rank {self.rank} stops too. To continue, {fix}: the run resumes from its newest checkpoint"

    def _claim(self) -> bool:
        """True for the first caller only: one message, from the judge or from the main thread."""
        with self._lock:
            first, self._claimed = not self._claimed, True
        return first

    def on_error(self, e: BaseException) -> BaseException:
        """The exception this process should end with. Its own error is posted first (the other ranks
        end with it) and returned as it is; a failed collective becomes a :class:`PeerFailure` naming the
        rank at fault, when one is found within a few heartbeats."""
        if not is_comms_error(e):
            with self._lock:
                self._to_post.append(_first_line(e))
            self._wake.set()
            self._posted.wait(2 * self.interval + 1.0)
            return e
        deadline = time.monotonic() + 4 * self.interval + 1.0
        why, fix = None, "launch the same command again"
        while why is None and time.monotonic() < deadline:
            with self._lock:
                reports = [(r, text) for r, text in self.reports if r != self.rank]
            if reports:
                why = f"rank {reports[0][0]} failed: {reports[0][1]}"
                fix = f"fix the cause (rank {reports[0][0]}'s log has the traceback) and launch again"
            else:
                # A live peer's counter moves at least every two heartbeats as this thread reads it.
                why = self._verdict(3 * self.interval)
                time.sleep(0.1)
        if why is None and "timed out" in str(e).lower():
            with self._lock:
                phases = {**self.phases, self.rank: _phase}
            where = ", ".join(f"rank {r} at {phases[r]!r}" for r in sorted(phases))
            why = (
                f"a collective waited longer than distributed.timeout_sec ({self.timeout:g} s) while every "
                f"rank was alive ({where}): one rank worked alone for longer than that (raise "
                "distributed.timeout_sec) or the ranks are out of step"
            )
            fix = "raise distributed.timeout_sec if a rank was only slow, and launch again"
        if why is None:
            return e
        self._claim()
        return PeerFailure(why + self._after(fix))

    def finish(self) -> None:
        """Stop both threads; a normal end is posted (``done``), so the others do not take this
        process's exit for a loss."""
        self._finishing.set()
        self._wake.set()
        self._beat.join(2 * self.interval + 1.0)


def use_bf16(cfg, dist_info: DistInfo) -> bool:
    """Whether training config ``cfg`` computes in bf16 (``precision``; ``auto``: on GPU)."""
    if cfg.precision == "bf16":
        return True
    return cfg.precision == "auto" and dist_info.device.type == "cuda"


def autocast(cfg, dist_info: DistInfo):
    """bf16 autocast on GPU (FSDP casts through its mixed-precision policy instead)."""
    fsdp = dist_info.distributed and cfg.distributed.strategy == "fsdp"
    if use_bf16(cfg, dist_info) and not fsdp:
        return torch.autocast(device_type=dist_info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_model(model: nn.Module, cfg, dist_info: DistInfo) -> nn.Module:
    """``model`` under DDP or FSDP2 (``distributed.strategy``) when several processes train it."""
    if not dist_info.distributed:
        return model
    if cfg.distributed.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .fsdp import shard_model

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if use_bf16(cfg, dist_info) else None, reduce_dtype=torch.float32
    )
    for p in model.parameters():  # FSDP shards uniform float32 parameters; bf16 compute via the policy
        p.data = p.data.float()
    shard_model(model, mp)
    return model
