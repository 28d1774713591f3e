"""Serving a fine-tuned (TTT) Moshi to several people at once, over moshi's websocket protocol.

The server speaks the protocol of moshi 0.2.13's ``moshi.server`` (what its web UI and ``moshi.client``
use): a websocket at ``/api/chat``; every message is binary, its first byte a kind. The server sends
the handshake (kind 0) when a conversation starts, then Moshi's voice as Ogg/Opus pages (kind 1) and
its text as UTF-8 word pieces (kind 2); the client sends the user's voice as Ogg/Opus pages (kind 1).
Errors go out as kind 5 (the ``error`` message of moshi's web client) followed by a close whose reason
repeats the message.

Slots. The model streams a batch of ``batch_size`` conversation slots, one 80 ms frame per step for
the whole batch (:class:`SlotBatch`). A connection takes a free slot (or is refused with an error when
all are busy); before its first frame the slot's state is reset: moshi's ``LMGen`` (delay cache,
KV caches, positions), every TTT layer's fast weights (back to ``W^(0)``) and the slot's Mimi encoder
and decoder. Each step runs the slots whose client has delivered a whole frame of audio; the others
(idle slots, clients whose audio has not arrived yet) are masked out with moshi's ``exec_mask``, which
leaves their state exactly as it was. So, in a given slot, a conversation's output depends only on its
own audio, bit for bit: every step runs the whole batch with the same shapes, and each slot's TTT
update is computed on its own (a batched update over the slots that happen to end a chunk together
would round differently on some CPUs). Another slot index may round differently (a kernel can treat
a row by its place in the batch), so that part holds only up to float32 rounding. A slow or silent
client never holds the others back, and one that leaves frees its slot with nothing carried over to
the next caller (the slot is reset when it is taken again).

Mimi. moshi 0.2.13's Mimi streams per batch element: its streaming convolutions, transposed
convolutions and the encoder/decoder transformers' KV caches all honour ``exec_mask`` and
``reset_streaming(mask)``. One batched Mimi therefore serves every slot (one encode and one decode
call per step for the whole batch instead of ``batch_size`` batch-1 calls, and one set of CUDA
graphs); a slot's codes do not depend on what the other rows hold (tested: a conversation gets the
same output alone in its slot as beside another). Like ``moshi.server``, the first frame of a conversation is
encoded and then the slot's Mimi is reset, so the next frame is encoded with the initial padding
again (the LM replaces the first frame's codes with its initial token anyway).

Threads. All model work (resets, Mimi, the LM step, Opus encoding of the output) runs in one worker
thread, one step at a time; the event loop only moves bytes, so receiving and sending never wait
for the model and the model never waits for a client (each connection has its own outbox).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Message kinds (the first byte of each binary websocket message), as moshi 0.2.13's server.py and
# client.py use them and its web client's protocol/encoder.ts decodes them.
KIND_HANDSHAKE = 0
KIND_AUDIO = 1
KIND_TEXT = 2
KIND_ERROR = 5

OGG_CAPTURE = b"OggS"  # the first bytes of every Ogg page

# Close codes (RFC 6455): 1003 unsupported data, 1008 policy violation, 1011 internal error,
# 1013 try again later.
CLOSE_BAD_INPUT = 1003
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_BUSY = 1013

# moshi.server's default web UI: a built copy of moshi's client, kept on the Hub.
WEB_UI_REPO, WEB_UI_FILE = "kyutai/moshi-artifacts", "dist.tgz"


@dataclass
class Sampling:
    """How Moshi picks its tokens (moshi's LMGen arguments; moshi.server's defaults)."""

    greedy: bool = False
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25


@dataclass
class StepOutput:
    """One step of the batch: per slot, Moshi's next frame (where ``valid``)."""

    valid: np.ndarray  # [B] bool: the slot ran this step and its LM delay has passed
    text: np.ndarray  # [B] int64: text token (meaningful where valid)
    pcm: np.ndarray  # [B, frame_size] float32: Moshi's voice (zeros where not valid)


class SlotBatch:
    """``batch_size`` conversation slots of one model, streamed together one 80 ms frame per step.

    Holds the streaming state of a :class:`moshi_ttt.TTTLMGen` (moshi's ``LMGen`` for TTT models,
    CUDA graphs included) and of Mimi for the whole batch while it lives; :meth:`close` releases
    it. Not thread-safe: call it from one thread.
    """

    def __init__(
        self,
        lm: torch.nn.Module,
        mimi: torch.nn.Module,
        batch_size: int,
        sampling: Sampling | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        from moshi_ttt import TTTLMGen

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.lm, self.mimi = lm, mimi
        self.device = next(lm.parameters()).device
        self.frame_size = int(mimi.frame_size)
        self.sample_rate = int(mimi.sample_rate)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # support_out_of_sync: LMGen would otherwise return nothing for max_delay steps after any
        # slot's reset (its warm-up counter is batch-wide); per-slot validity comes from its mask.
        sp = sampling or Sampling()
        self.gen = TTTLMGen(
            lm,
            use_sampling=not sp.greedy,
            temp=sp.temp,
            temp_text=sp.temp_text,
            top_k=sp.top_k,
            top_k_text=sp.top_k_text,
            support_out_of_sync=True,
        )
        self.max_delay = int(self.gen.max_delay)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.gen.streaming(batch_size))
        self._stack.enter_context(mimi.streaming(batch_size))

    def close(self) -> None:
        """Leave streaming mode (the model can be streamed again, e.g. by another SlotBatch)."""
        self._stack.close()

    def _graphs(self):
        from moshi.utils.compile import no_cuda_graph

        return contextlib.nullcontext() if self.cuda_graphs else no_cuda_graph()

    def _mask(self, mask: np.ndarray) -> torch.Tensor:
        if mask.shape != (self.batch_size,):
            raise ValueError(f"slot mask must have shape ({self.batch_size},), got {mask.shape}")
        return torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device)

    @torch.no_grad()
    def reset(self, mask: np.ndarray) -> None:
        """Fresh state for the slots in ``mask`` ([B] bool): LMGen, TTT fast weights, Mimi."""
        m = self._mask(mask)
        self.gen.reset_streaming(m)  # LMGen's state, then (callback) the LM's: KV caches, TTT layers
        # step() resets the slot's Mimi again after its first frame (the re-pad); resetting it here
        # too means a joined slot holds nothing of the previous caller whatever runs first.
        self.mimi.reset_streaming(m)

    @torch.no_grad()
    def step(self, pcm: np.ndarray, active: np.ndarray, first: np.ndarray | None = None) -> StepOutput:
        """One frame for the slots in ``active``; the others do not move.

        ``pcm``: ``[B, frame_size]`` float32, the user's audio of this frame (ignored where not
        active); ``first``: slots whose conversation starts with this frame.
        """
        B, F = self.batch_size, self.frame_size
        if pcm.shape != (B, F):
            raise ValueError(f"pcm must have shape ({B}, {F}), got {pcm.shape}")
        act = self._mask(active)
        with self._graphs():
            x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32)).to(self.device)[:, None]
            self.mimi.set_exec_mask(act)
            codes = self.mimi.encode(x)  # [B, num_codebooks, 1]
            if first is not None and first.any():
                self.mimi.reset_streaming(self._mask(first))  # re-pad the next frame, as moshi.server
            self.gen.set_exec_mask(act)
            out = self.gen.step(codes)  # [B, 1 + dep_q, 1]; ungenerated_token_id where masked/too early
            assert out is not None  # support_out_of_sync
            valid = act & (out[:, 0, 0] != self.lm.ungenerated_token_id)
            audio = torch.where(valid[:, None, None], out[:, 1:], torch.zeros_like(out[:, 1:]))
            self.mimi.set_exec_mask(valid)
            voice = self.mimi.decode(audio)  # [B, 1, F]
        valid_np = valid.cpu().numpy()
        voice_np = voice[:, 0].float().cpu().numpy()
        voice_np[~valid_np] = 0.0
        return StepOutput(valid_np, out[:, 0, 0].cpu().numpy(), voice_np)

    def warmup(self, steps: int = 4) -> None:
        """A few steps on silence in every slot (CUDA graphs are captured here), then a full reset."""
        all_slots = np.ones(self.batch_size, dtype=bool)
        silence = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)
        for i in range(max(steps, self.max_delay + 2)):
            self.step(silence, all_slots, all_slots if i == 0 else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.reset(all_slots)


class _Conversation:
    """One connection holding a slot: its Opus codecs, audio not yet stepped and its outbox."""

    def __init__(self, slot: int, sample_rate: int, frame_size: int, ws, transport, peer: str) -> None:
        import sphn

        self.slot, self.peer, self.frame_size = slot, peer, frame_size
        self.ws, self.transport = ws, transport
        self.reader = sphn.OpusStreamReader(sample_rate)
        self.writer = sphn.OpusStreamWriter(sample_rate)
        self.frames: collections.deque[np.ndarray] = collections.deque()
        self._partial = np.zeros(0, dtype=np.float32)
        self.needs_reset = True
        self.steps = 0
        self.audio_bytes = 0  # Ogg/Opus bytes received
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False
        self.close_code: int | None = None  # set when the server ends the conversation
        self.close_reason = ""
        self.started = time.monotonic()

    def push(self, pcm: np.ndarray) -> None:
        buf = np.concatenate([self._partial, pcm.astype(np.float32, copy=False)])
        n = len(buf) // self.frame_size
        for i in range(n):
            self.frames.append(buf[i * self.frame_size : (i + 1) * self.frame_size])
        self._partial = buf[n * self.frame_size :]


class ConversationServer:
    """The websocket side: slot table, the batch loop and ``/api/chat``.

    ``max_backlog_s``: audio a client may send ahead of the model (seconds) before it is
    disconnected; ``max_outbox``: messages waiting for a client that does not read them.
    """

    def __init__(
        self,
        batch: SlotBatch,
        tokenizer,
        *,
        text_skip: tuple[int, ...] = (0, 3),
        max_backlog_s: float = 60.0,
        max_outbox: int = 2000,
    ) -> None:
        self.batch = batch
        self.tokenizer = tokenizer
        self.text_skip = set(text_skip)
        self.max_backlog_frames = int(max_backlog_s * batch.sample_rate / batch.frame_size)
        self.max_outbox = max_outbox
        self.slots: list[_Conversation | None] = [None] * batch.batch_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moshi-ttt-serve")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._hangups: set[asyncio.Task] = set()
        self.steps = 0
        self.step_ms: collections.deque[float] = collections.deque(maxlen=1000)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._batch_loop(), name="moshi-ttt-batch-loop")

    async def stop(self) -> None:
        """Close every connection, stop the batch loop, release the model's streaming state."""
        for conv in [c for c in self.slots if c is not None]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conv.ws.close(code=1001, message=b"server shutting down"), 2.0)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await asyncio.get_running_loop().run_in_executor(self._executor, self.batch.close)
        self._executor.shutdown(wait=True)

    def busy_slots(self) -> int:
        return sum(c is not None for c in self.slots)

    async def run_in_worker(self, fn, *args):
        """Run ``fn`` in the model's worker thread (where all model calls happen)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ batch loop
    def _take_slot(self, ws, request) -> _Conversation | None:
        for i, c in enumerate(self.slots):
            if c is None:
                b = self.batch
                conv = _Conversation(
                    i, b.sample_rate, b.frame_size, ws, request.transport, request.remote or "?"
                )
                self.slots[i] = conv
                return conv
        return None

    def _release(self, conv: _Conversation) -> None:
        conv.closed = True
        if self.slots[conv.slot] is conv:
            self.slots[conv.slot] = None

    async def _batch_loop(self) -> None:
        assert self._wake is not None
        B, F = self.batch.batch_size, self.batch.frame_size
        while True:
            convs = [c if c is not None and not c.closed else None for c in self.slots]
            reset = np.array([c is not None and c.needs_reset for c in convs])
            active = np.array([c is not None and len(c.frames) > 0 for c in convs])
            if not reset.any() and not active.any():
                self._wake.clear()
                await self._wake.wait()
                continue
            pcm = np.zeros((B, F), dtype=np.float32)
            first = np.zeros(B, dtype=bool)
            for b, c in enumerate(convs):
                if c is None:
                    continue
                c.needs_reset = False
                if active[b]:
                    pcm[b] = c.frames.popleft()
                    first[b] = c.steps == 0
                    c.steps += 1
            t0 = time.perf_counter()
            try:
                messages = await self.run_in_worker(self._tick, reset, pcm, active, first, convs)
            except Exception:
                logger.exception("model step failed; ending the conversations of this step")
                for c in convs:
                    if c is not None:
                        self._fail(c, "internal server error while running the model", CLOSE_INTERNAL)
                continue
            if active.any():
                self.steps += 1
                self.step_ms.append((time.perf_counter() - t0) * 1e3)
            for c, msgs in zip(convs, messages):
                if c is None or c.closed:
                    continue
                for m in msgs:
                    c.outbox.put_nowait(m)
                if c.outbox.qsize() > self.max_outbox:
                    self._fail(
                        c, "the client does not read what the server sends; disconnecting", CLOSE_POLICY
                    )

    def _tick(self, reset, pcm, active, first, convs) -> list[list[bytes]]:
        """Worker thread: resets, one step, and the output of each slot as protocol messages."""
        messages: list[list[bytes]] = [[] for _ in convs]
        if reset.any():
            self.batch.reset(reset)
        if not active.any():
            return messages
        out = self.batch.step(pcm, active, first)
        for b, c in enumerate(convs):
            if c is None or not out.valid[b]:
                continue
            # Text before voice (moshi.server sends the voice first; clients take either order): a
            # client holding frame k's voice then holds all the text up to frame k.
            piece = self._text_piece(int(out.text[b]))
            if piece:
                messages[b].append(bytes([KIND_TEXT]) + piece.encode("utf-8"))
            opus = c.writer.append_pcm(out.pcm[b])
            if len(opus) > 0:
                messages[b].append(bytes([KIND_AUDIO]) + opus)
        return messages

    def _text_piece(self, token: int) -> str:
        if token in self.text_skip or self.tokenizer is None or not 0 <= token < self.tokenizer.vocab_size():
            return ""
        return self.tokenizer.id_to_piece(token).replace("\u2581", " ")

    # ------------------------------------------------------------------ websocket side
    def _fail(self, conv: _Conversation, message: str, code: int) -> None:
        """End ``conv``: its slot is free at once; the client gets the error message, then a close."""
        if conv.closed:
            return
        logger.warning("slot %d (%s): %s", conv.slot, conv.peer, message)
        self._release(conv)
        while not conv.outbox.empty():  # what was not sent yet is dropped: the error goes out next
            conv.outbox.get_nowait()
        conv.close_code, conv.close_reason = code, message
        conv.outbox.put_nowait(_error_message(message))
        conv.outbox.put_nowait(None)  # the send loop sends the error, then closes
        task = asyncio.get_running_loop().create_task(self._hang_up(conv))
        self._hangups.add(task)
        task.add_done_callback(self._hangups.discard)

    async def _hang_up(self, conv: _Conversation, grace_s: float = 5.0) -> None:
        """A client that reads nothing cannot take the error or the close either: cut it off."""
        await asyncio.sleep(grace_s)
        if not conv.ws.closed and conv.transport is not None:
            conv.transport.abort()

    async def handle_chat(self, request):
        from aiohttp import web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conv = self._take_slot(ws, request)
        if conv is None:
            msg = f"all {self.batch.batch_size} conversation slots are busy; try again later"
            logger.info("refused %s: %s", request.remote, msg)
            await _close_with_error(ws, msg, CLOSE_BUSY)
            return ws
        peer = conv.peer
        logger.info("slot %d: %s connected (%d/%d busy)", conv.slot, peer, self.busy_slots(), len(self.slots))
        conv.outbox.put_nowait(bytes([KIND_HANDSHAKE]))
        sender = asyncio.create_task(self._send_loop(ws, conv))
        try:
            await self._recv_loop(ws, conv)
        finally:
            self._release(conv)
            conv.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 5.0)
            if not ws.closed:
                try:
                    await asyncio.wait_for(
                        ws.close(code=conv.close_code or 1000, message=_reason(conv.close_reason)), 2.0
                    )
                except Exception:  # a peer that reads nothing cannot take a close frame either
                    if conv.transport is not None:
                        conv.transport.abort()
            logger.info(
                "slot %d: %s left after %d frames (%.1f s)",
                conv.slot,
                peer,
                conv.steps,
                time.monotonic() - conv.started,
            )
        return ws

    async def _send_loop(self, ws, conv: _Conversation) -> None:
        while True:
            msg = await conv.outbox.get()
            if msg is None:
                break
            try:
                await ws.send_bytes(msg)
            except Exception:  # the peer went away: the receive side sees the close and cleans up
                break
        if conv.close_code is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    ws.close(code=conv.close_code, message=_reason(conv.close_reason)), 2.0
                )

    async def _recv_loop(self, ws, conv: _Conversation) -> None:
        import aiohttp

        async for message in ws:
            if conv.closed:
                break
            if message.type == aiohttp.WSMsgType.ERROR:
                logger.warning("slot %d: websocket error %s", conv.slot, ws.exception())
                break
            if message.type != aiohttp.WSMsgType.BINARY:
                self._fail(
                    conv,
                    f"expected binary messages, got a {message.type.name.lower()} message",
                    CLOSE_BAD_INPUT,
                )
                break
            data: bytes = message.data
            if len(data) == 0:
                self._fail(conv, "empty message (expected a kind byte, then the payload)", CLOSE_BAD_INPUT)
                break
            if data[0] != KIND_AUDIO:
                self._fail(
                    conv,
                    f"unknown message kind {data[0]}: this server accepts audio (kind {KIND_AUDIO}, Ogg/Opus) only",
                    CLOSE_BAD_INPUT,
                )
                break
            payload = data[1:]
            try:
                # sphn's reader checks a page only once its 27-byte header is complete, so a short
                # bad first message would wait unnoticed: an Ogg stream starts with b"OggS".
                head = OGG_CAPTURE[conv.audio_bytes : conv.audio_bytes + len(payload)]
                if head and not payload.startswith(head):
                    raise ValueError(
                        f"it starts with {bytes(payload[:4])!r}, an Ogg stream with {OGG_CAPTURE!r}"
                    )
                conv.audio_bytes += len(payload)
                pcm = conv.reader.append_bytes(payload)
            except ValueError as e:  # sphn raises ValueError on anything that is not an Ogg/Opus stream
                self._fail(conv, f"audio message is not an Ogg/Opus stream ({e})", CLOSE_BAD_INPUT)
                break
            if pcm.size == 0:
                continue
            conv.push(pcm)
            if len(conv.frames) > self.max_backlog_frames:
                self._fail(
                    conv,
                    f"audio arrives faster than the server can process it (more than "
                    f"{self.max_backlog_frames} frames waiting); send it in real time",
                    CLOSE_POLICY,
                )
                break
            assert self._wake is not None
            self._wake.set()
        # A close initiated by the server (after _fail) is finished by the send loop.


def _error_message(text: str) -> bytes:
    return bytes([KIND_ERROR]) + text.encode("utf-8")


def _reason(text: str) -> bytes:
    """A close reason must fit in a control frame (123 bytes)."""
    raw = text.encode("utf-8")
    return raw if len(raw) <= 123 else raw[:120] + b"..."


async def _close_with_error(ws, message: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_bytes(_error_message(message))
        await ws.close(code=code, message=_reason(message))


def resolve_static(static: str | None) -> str | None:
    """The web UI directory to serve, as ``moshi.server`` chooses it.

    ``None``: moshi's built web UI from the Hub (``kyutai/moshi-artifacts``, ``dist.tgz``, unpacked
    beside the download); ``"none"``: no static content; anything else: that directory.
    """
    if static == "none":
        return None
    if static is not None:
        if not (Path(static) / "index.html").is_file():
            raise FileNotFoundError(
                f"--static {static}: no index.html there (a built web UI directory, or 'none')"
            )
        return str(static)
    from huggingface_hub import hf_hub_download

    try:
        archive = Path(hf_hub_download(WEB_UI_REPO, WEB_UI_FILE))
    except Exception as e:
        raise RuntimeError(
            f"cannot fetch moshi's web UI ({WEB_UI_REPO}/{WEB_UI_FILE}: {e}); pass --static DIR with a built "
            "copy, or --static none to serve the websocket only"
        ) from e
    dist = archive.parent / "dist"
    if not dist.exists():
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(path=archive.parent, filter="data")
    return str(dist)


def make_app(server: ConversationServer, static_path: str | None):
    """The aiohttp application: ``/api/chat`` plus the web UI (``/`` = its index.html) if given."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/api/chat", server.handle_chat)
    if static_path is not None:

        async def index(_request):
            return web.FileResponse(os.path.join(static_path, "index.html"))

        app.router.add_get("/", index)
        app.router.add_static("/", path=static_path, follow_symlinks=True, name="static")

    async def on_startup(_app):
        await server.start()

    async def on_shutdown(_app):
        await server.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_server(
    checkpoint: str | Path,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str | None = None,
    ttt_updates: bool = True,
    sampling: Sampling | None = None,
    cuda_graphs: bool = True,
    seed: int = 42424242,
    warmup: bool = True,
    **server_kwargs,
) -> ConversationServer:
    """A run or checkpoint of this project, loaded with its own tokenizer and Mimi, ready to serve."""
    from moshi_ttt import set_ttt_updates, ttt_gatings

    from .inference import load_checkpoint_model

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    loaded = load_checkpoint_model(checkpoint, device, dtype=DTYPES[dtype] if dtype else None)
    if loaded.ttt:
        set_ttt_updates(loaded.lm, ttt_updates)
        n = len(ttt_gatings(loaded.lm))
        logger.info("%d TTT layer(s), fast-weight updates %s", n, "on" if ttt_updates else "off (W^(0) kept)")
    elif not ttt_updates:
        logger.warning("--no-ttt-updates: %s has no TTT layers, nothing to turn off", loaded.checkpoint)
    torch.manual_seed(seed)
    batch = SlotBatch(loaded.lm, loaded.mimi, batch_size, sampling, cuda_graphs=cuda_graphs)
    if warmup:
        batch.warmup()
    lm = loaded.lm
    skip = (lm.text_padding_token_id, lm.end_of_text_padding_id)
    return ConversationServer(batch, loaded.tokenizer, text_skip=skip, **server_kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="serve.py",
        description="Talk to a fine-tuned (TTT) Moshi: moshi's websocket protocol and web UI, "
        "BATCH_SIZE conversations at once, each with its own fast weights.",
    )
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--batch-size", type=int, default=4, help="conversation slots served at once")
    p.add_argument("--no-ttt-updates", action="store_true", help="keep the fast weights at W^(0) (A/B)")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="LM dtype (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run without moshi's CUDA graphs on GPU")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--temp-text", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=250)
    p.add_argument("--top-k-text", type=int, default=25)
    p.add_argument("--seed", type=int, default=42424242)
    p.add_argument(
        "--static", default=None, help="web UI directory; default: moshi's from the Hub; 'none': no UI"
    )
    p.add_argument("--ssl", default=None, help="directory with cert.pem and key.pem: serve https/wss")
    p.add_argument("--max-backlog", type=float, default=60.0, help="seconds of audio a client may send ahead")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from aiohttp import web

    ssl_context = None
    if args.ssl is not None:
        import ssl

        cert, key = Path(args.ssl) / "cert.pem", Path(args.ssl) / "key.pem"
        if not cert.is_file() or not key.is_file():
            print(f"error: --ssl {args.ssl}: expected cert.pem and key.pem there")
            return 2
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    try:
        static_path = resolve_static(args.static)
        server = build_server(
            args.checkpoint,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            ttt_updates=not args.no_ttt_updates,
            sampling=Sampling(args.greedy, args.temp, args.temp_text, args.top_k, args.top_k_text),
            cuda_graphs=not args.no_cuda_graphs,
            seed=args.seed,
            max_backlog_s=args.max_backlog,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}")
        return 2
    if static_path is not None:
        logger.info("serving the web UI from %s", static_path)
    scheme = "https" if ssl_context else "http"
    where = f"{scheme}://{args.host}:{args.port}"
    ui = f"web UI at {where}, " if static_path is not None else "no web UI (--static none), "
    logger.info(
        "%d conversation slots; %swebsocket at %s/api/chat",
        args.batch_size,
        ui,
        where.replace("http", "ws", 1),
    )
    web.run_app(make_app(server, static_path), host=args.host, port=args.port, ssl_context=ssl_context)
    return 0
