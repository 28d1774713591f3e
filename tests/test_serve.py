"""The conversation server: moshi's websocket protocol, B slots with per-slot state (tiny TTT checkpoint).

Every test starts the server in-process on a free port and talks to it with a websocket client
written here (aiohttp + sphn's Ogg/Opus codec), as moshi's client and web UI do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
import sphn
import torch
from aiohttp import web

from finetune.inference import read_user_audio
from finetune.serve import (
    CLOSE_BAD_INPUT,
    CLOSE_BUSY,
    CLOSE_POLICY,
    KIND_AUDIO,
    KIND_ERROR,
    KIND_HANDSHAKE,
    KIND_TEXT,
    Sampling,
    build_server,
    make_app,
    resolve_static,
)

SR, FRAME = 24000, 1920
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def voices(tiny_ds):
    """Two users' speech, 32 frames of 80 ms each (2.6 s; the generated users start talking at 3-4 s)."""
    files = sorted((tiny_ds / "audio").glob("conv_*.wav"))[:2]
    return [read_user_audio(f)[38 * FRAME : 70 * FRAME] for f in files]


@contextlib.asynccontextmanager
async def serving(ckpt, batch_size: int, sampling: Sampling | None = None, static: str | None = None, **kw):
    sampling = sampling or Sampling(greedy=True)
    server = build_server(ckpt, batch_size=batch_size, sampling=sampling, warmup=False, **kw)
    runner = web.AppRunner(make_app(server, static))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"ws://127.0.0.1:{port}/api/chat"
    finally:
        await runner.cleanup()


@dataclass
class Reply:
    pcm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    text: list[str] = field(default_factory=list)
    handshake: bool = False
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None


async def converse(
    url: str,
    audio: np.ndarray,
    expect_frames: int,
    *,
    pause_at: int | None = None,
    resume: asyncio.Event | None = None,
    connected: asyncio.Event | None = None,
) -> Reply:
    """Send ``audio`` frame by frame (Ogg/Opus, kind 1); collect Moshi's voice and text until
    ``expect_frames`` frames of voice came back. ``pause_at``: stop sending there until ``resume``;
    ``connected`` is set once the handshake came (the connection holds its slot from then on)."""
    reply = Reply()
    writer, reader = sphn.OpusStreamWriter(SR), sphn.OpusStreamReader(SR)
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        first = await asyncio.wait_for(ws.receive(), TIMEOUT)
        reply.handshake = first.type == aiohttp.WSMsgType.BINARY and first.data == bytes([KIND_HANDSHAKE])
        if connected is not None:
            connected.set()

        async def send() -> None:
            for f in range(len(audio) // FRAME):
                if f == pause_at and resume is not None:
                    await resume.wait()
                opus = writer.append_pcm(audio[f * FRAME : (f + 1) * FRAME])
                if len(opus):
                    await ws.send_bytes(bytes([KIND_AUDIO]) + opus)
                await asyncio.sleep(0)

        sender = asyncio.create_task(send())
        chunks = []
        while sum(len(c) for c in chunks) < expect_frames * FRAME:
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            kind, payload = msg.data[0], msg.data[1:]
            if kind == KIND_AUDIO:
                chunks.append(reader.append_bytes(payload))
            elif kind == KIND_TEXT:
                reply.text.append(payload.decode())
            elif kind == KIND_ERROR:
                reply.errors.append(payload.decode())
        await sender
        reply.pcm = np.concatenate(chunks) if chunks else reply.pcm
    return reply


async def hold_slot(url: str, connected: asyncio.Event, release: asyncio.Event) -> None:
    """Take a slot (the first free one) and send nothing until ``release``: the slot stays idle."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        first = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert first.type == aiohttp.WSMsgType.BINARY and first.data == bytes([KIND_HANDSHAKE])
        connected.set()
        await release.wait()


async def drop_mid_stream(url: str, audio: np.ndarray, frames: int) -> None:
    """Send ``frames`` frames without reading anything back, then cut the TCP connection (no close frame)."""
    writer = sphn.OpusStreamWriter(SR)
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url)
    for f in range(frames):
        await ws.send_bytes(bytes([KIND_AUDIO]) + writer.append_pcm(audio[f * FRAME : (f + 1) * FRAME]))
    await asyncio.sleep(0.2)  # let the server step some of it
    ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        await session.close()


async def bad_client(url: str, payload: bytes | str | None) -> Reply:
    """Connect, send one bad message (``None``: nothing) after the handshake, read until the server closes."""
    reply = Reply()
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        while True:
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            kind, body = msg.data[0], msg.data[1:]
            if kind == KIND_HANDSHAKE:
                reply.handshake = True
                if isinstance(payload, str):
                    await ws.send_str(payload)
                elif payload is not None:
                    await ws.send_bytes(payload)
            elif kind == KIND_ERROR:
                reply.errors.append(body.decode())
            else:
                reply.text.append(f"unexpected kind {kind}")
        reply.close_code = ws.close_code
    return reply


async def wait_free(server, timeout: float = TIMEOUT) -> None:
    for _ in range(int(timeout / 0.01)):
        if server.busy_slots() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never freed the slot")


def same(a: Reply, b: Reply) -> bool:
    return a.text == b.text and np.array_equal(a.pcm, b.pcm)


def _frames(audio, server) -> int:
    return len(audio) // FRAME - server.batch.max_delay  # LMGen's output lags by max_delay frames


def _fast_weights(batch, slot: int) -> list[torch.Tensor]:
    """The slot's TTT state in every layer, with the updates of chunks that just completed applied
    (TTTLMGen defers them to the next step; applying them now changes nothing that follows)."""
    from moshi_ttt import ttt_gatings

    gatings = list(ttt_gatings(batch.lm).values())
    for g in gatings:
        g.prepare_graph_step()
    return [g._streaming_state.delta[slot].clone() for g in gatings]


def _slot_schedule(batch, jobs: dict, p_active: float, seed: int) -> dict:
    """Drive a SlotBatch directly: ``jobs[slot]`` is a list of conversations (audio) taken one after
    another in that slot (the slot reset in between, as for a new caller); at each step a slot with
    audio left runs with probability ``p_active``. Returns, keyed by (slot, index in jobs[slot]), each
    conversation's text tokens, voice, text logits (before sampling) and final TTT state."""
    rng = np.random.default_rng(seed)
    B, F = batch.batch_size, batch.frame_size
    todo = {s: list(enumerate(convs)) for s, convs in jobs.items()}
    now: dict = {}  # slot -> (key, audio frames, frames sent)
    out: dict = {}
    logits: list[torch.Tensor] = []
    hook = batch.lm.text_linear.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))
    try:
        while True:
            reset = np.zeros(B, dtype=bool)
            for s in todo:
                if (s not in now or now[s][2] == len(now[s][1])) and todo[s]:
                    if s in now:
                        out[now[s][0]][3].extend(_fast_weights(batch, s))
                    i, audio = todo[s].pop(0)
                    now[s] = ((s, i), audio.reshape(-1, F), 0)
                    out[(s, i)] = ([], [], [], [])
                    reset[s] = True
            if not reset.any() and all(sent == len(frames) for _, frames, sent in now.values()):
                break
            if reset.any():
                batch.reset(reset)
            pcm = np.zeros((B, F), dtype=np.float32)
            active, first = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool)
            for s, (key, frames, sent) in now.items():
                if sent < len(frames) and rng.random() < p_active:
                    pcm[s], active[s], first[s] = frames[sent], True, sent == 0
                    now[s] = (key, frames, sent + 1)
            if active.any():
                logits.clear()
                res = batch.step(pcm, active, first)
                for s, (key, _, _) in now.items():
                    if res.valid[s]:
                        out[key][0].append(int(res.text[s]))
                        out[key][1].append(res.pcm[s])
                        out[key][2].append(logits[-1][s])
        for s, (key, _, _) in now.items():
            out[key][3].extend(_fast_weights(batch, s))
    finally:
        hook.remove()
    return {k: (t, np.concatenate(v), torch.stack(lg), w) for k, (t, v, lg, w) in out.items()}


@pytest.mark.numerics
def test_slot_batch_masks_and_resets_keep_slots_independent(tiny_ckpt, voices, tiny_ds):
    """At the model level: random exec masks (slots stepping at random moments), a slot reset for a
    new caller while the other slot is mid-conversation, and both slots in lockstep (their chunks end
    on the same steps); each conversation equals itself alone in the same slot, bit for bit: text
    logits before sampling, tokens, voice and final fast weights. Exact by construction (whole-batch
    steps, ``torch.where`` masks, per-slot TTT updates). The lockstep run is the one that caught a
    batched update over the slots that finished a chunk together: with MKL's AVX2 kernels
    (``make test-avx2``) it rounded differently from a slot's update alone."""
    from finetune.inference import load_checkpoint_model
    from finetune.serve import SlotBatch

    loaded = load_checkpoint_model(tiny_ckpt)
    x, (a, b) = (
        read_user_audio(sorted((tiny_ds / "audio").glob("conv_*.wav"))[2])[40 * FRAME : 64 * FRAME],
        voices,
    )
    a, b = a[: 24 * FRAME], b[: 24 * FRAME]
    batch = SlotBatch(loaded.lm, loaded.mimi, 2, Sampling(greedy=True))
    try:
        mixed = _slot_schedule(batch, {0: [x, a], 1: [b]}, p_active=0.6, seed=0)
        lockstep = _slot_schedule(batch, {0: [a], 1: [b]}, p_active=1.0, seed=0)
        alone_a = _slot_schedule(batch, {0: [a]}, p_active=1.0, seed=0)[(0, 0)]
        alone_b = _slot_schedule(batch, {1: [b]}, p_active=1.0, seed=0)[(1, 0)]
    finally:
        batch.close()
    assert len(alone_a[0]) == 24 - batch.max_delay
    pairs = [(mixed[(0, 1)], alone_a), (mixed[(1, 0)], alone_b)]
    pairs += [(lockstep[(0, 0)], alone_a), (lockstep[(1, 0)], alone_b)]
    for together, alone in pairs:
        assert together[0] == alone[0]
        assert np.array_equal(together[1], alone[1])
        assert torch.equal(together[2], alone[2])
        assert len(together[3]) == len(alone[3]) > 0
        assert all(torch.equal(w, w_alone) for w, w_alone in zip(together[3], alone[3]))
        assert all(w.any() for w in alone[3])  # the fast weights moved
    assert alone_a[0] != alone_b[0]


def test_conversation_gets_voice_and_text_back(tiny_ckpt, voices):
    async def main():
        # Sampling, as served by default (the other tests decode greedily to compare outputs).
        async with serving(tiny_ckpt, 1, Sampling(temp=1.0, temp_text=1.0), seed=3) as (server, url):
            return await converse(url, voices[0], _frames(voices[0], server)), server

    reply, server = asyncio.run(main())
    assert reply.handshake and not reply.errors
    n = _frames(voices[0], server)
    assert len(reply.pcm) == n * FRAME  # one 80 ms frame of Moshi's voice per frame sent, after the delay
    assert np.abs(reply.pcm).max() > 1e-3
    assert reply.text and all(isinstance(t, str) and t for t in reply.text)
    vocab = {
        server.tokenizer.id_to_piece(i).replace("\u2581", " ") for i in range(server.tokenizer.vocab_size())
    }
    assert set(reply.text) <= vocab


@pytest.mark.numerics
def test_concurrent_conversations_equal_each_alone(tiny_ckpt, voices):
    """Fast weights (and everything else) are per slot: two conversations at once, one of them pausing
    mid-way while the other goes on, get exactly what each gets alone in the same slot. Exact by
    construction: every step runs the whole batch (same shapes whoever is active), idle slots are
    masked with ``torch.where``, and each slot's TTT update is computed alone. The slot is pinned
    (an idle client holds slot 0 while b talks alone in slot 1): another slot index may round
    differently on some CPUs (README, "Slots"). With TTT updates off the output changes, so the TTT
    state really shapes what is compared."""

    async def main():
        a, b = voices
        async with serving(tiny_ckpt, 2) as (server, url):
            na, nb = _frames(a, server), _frames(b, server)
            alone_a = await converse(url, a, na)  # slot 0, slot 1 free
            await wait_free(server)
            held, release = asyncio.Event(), asyncio.Event()
            holder = asyncio.create_task(hold_slot(url, held, release))
            await asyncio.wait_for(held.wait(), TIMEOUT)
            assert server.slots[0] is not None
            alone_b = await converse(url, b, nb)  # slot 1, slot 0 idle
            release.set()
            await holder
            await wait_free(server)
            a_in, resume = asyncio.Event(), asyncio.Event()
            task_a = asyncio.create_task(converse(url, a, na, connected=a_in))
            await asyncio.wait_for(a_in.wait(), TIMEOUT)  # a holds slot 0 before b connects
            task_b = asyncio.create_task(converse(url, b, nb, pause_at=12, resume=resume))
            both_a = await task_a  # b is paused meanwhile: a must not wait for it
            resume.set()
            both_b = await task_b
        async with serving(tiny_ckpt, 2, ttt_updates=False) as (server, url):
            frozen_a = await converse(url, a, na)
        return alone_a, alone_b, both_a, both_b, frozen_a

    alone_a, alone_b, both_a, both_b, frozen_a = asyncio.run(main())
    assert len(alone_a.pcm) > 0 and len(alone_b.pcm) > 0
    assert same(alone_a, both_a)
    assert same(alone_b, both_b)
    assert not same(alone_a, alone_b)
    assert not np.array_equal(alone_a.pcm, frozen_a.pcm)


@pytest.mark.numerics
def test_reconnect_and_dropped_client_start_from_a_reset_slot(tiny_ckpt, voices):
    async def main():
        a, other = voices
        async with serving(tiny_ckpt, 1) as (server, url):
            n = _frames(a, server)
            fresh = await converse(url, a, n)
            await wait_free(server)
            await converse(url, other, _frames(other, server))  # the slot's state now holds `other`
            await wait_free(server)
            again = await converse(url, a, n)
            await wait_free(server)
            await drop_mid_stream(url, other, 20)
            await wait_free(server)
            after_drop = await converse(url, a, n)
        return fresh, again, after_drop

    fresh, again, after_drop = asyncio.run(main())
    assert len(fresh.pcm) > 0
    assert same(fresh, again)
    assert same(fresh, after_drop)


@pytest.mark.numerics
def test_moshi_client_works_unchanged(tiny_ckpt, voices, monkeypatch):
    """moshi 0.2.13's own command-line client (``moshi.client.Connection``, its sound devices replaced by
    stand-ins that this test drives frame by frame) gets the same voice and text as the client above."""
    import importlib
    import io
    import sys
    import types

    class _Device:  # sounddevice's InputStream / OutputStream: the callbacks are called by the test
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("sounddevice")
    fake.InputStream = fake.OutputStream = _Device
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    monkeypatch.delitem(sys.modules, "moshi.client", raising=False)
    moshi_client = importlib.import_module("moshi.client")

    async def main():
        a = voices[0]
        async with serving(tiny_ckpt, 1) as (server, url):
            n = _frames(a, server)
            ours = await converse(url, a, n)
            await wait_free(server)
            text = io.StringIO()
            printer = moshi_client.RawPrinter(stream=text, err_stream=io.StringIO())
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                conn = moshi_client.Connection(printer, ws, asyncio.get_running_loop())
                receiving = asyncio.create_task(conn._recv_loop())
                for f in range(len(a) // FRAME):  # what the microphone callback gets, 80 ms at a time
                    conn._on_audio_input(a[f * FRAME : (f + 1) * FRAME, None], FRAME, None, None)
                    await asyncio.sleep(0)
                for _ in range(int(TIMEOUT / 0.01)):
                    if conn._output_queue.qsize() >= n:
                        break
                    await asyncio.sleep(0.01)
                await ws.close()
                await receiving
            played = [conn._output_queue.get_nowait() for _ in range(conn._output_queue.qsize())]
        return ours, text.getvalue(), np.concatenate(played)

    ours, text, played = asyncio.run(main())
    assert ours.text and text == "".join(ours.text)
    assert np.array_equal(played, ours.pcm)


def test_all_slots_busy_is_refused_clearly(tiny_ckpt, voices):
    async def main():
        a = voices[0]
        async with serving(tiny_ckpt, 1) as (server, url):
            resume = asyncio.Event()
            holder = asyncio.create_task(converse(url, a, _frames(a, server), pause_at=5, resume=resume))
            while server.busy_slots() == 0:
                await asyncio.sleep(0.01)
            refused = await bad_client(url, None)
            resume.set()
            held = await holder
        return refused, held

    refused, held = asyncio.run(main())
    assert not refused.handshake
    assert refused.close_code == CLOSE_BUSY
    assert refused.errors == ["all 1 conversation slots are busy; try again later"]
    assert not held.errors and len(held.pcm) > 0  # the conversation holding the slot went on


BAD_INPUTS = [
    (bytes([KIND_AUDIO]) + b"this is not opus", "audio message is not an Ogg/Opus stream"),
    (bytes([KIND_AUDIO]) + b"OggS" + bytes(60), "audio message is not an Ogg/Opus stream"),
    (bytes([9]) + b"hello", "unknown message kind 9: this server accepts audio (kind 1, Ogg/Opus) only"),
    (b"", "empty message"),
    ("a text frame", "expected binary messages, got a text message"),
]


def test_bad_input_closes_only_that_connection(tiny_ckpt, voices):
    """Each bad client gets one error message and a close; a conversation in the other slot is
    untouched (same output as alone) and the bad clients' slot is free again."""

    async def main():
        a = voices[0]
        async with serving(tiny_ckpt, 2) as (server, url):
            n = _frames(a, server)
            alone = await converse(url, a, n)
            await wait_free(server)
            resume = asyncio.Event()
            good = asyncio.create_task(converse(url, a, n, pause_at=10, resume=resume))
            while server.busy_slots() == 0:
                await asyncio.sleep(0.01)
            bad = []
            for payload, _ in BAD_INPUTS:
                bad.append(await bad_client(url, payload))
                while server.busy_slots() > 1:
                    await asyncio.sleep(0.01)
            resume.set()
            return alone, await good, bad, server.busy_slots()

    alone, good, bad, busy_after = asyncio.run(main())
    for reply, (_, message) in zip(bad, BAD_INPUTS):
        assert reply.handshake and reply.close_code == CLOSE_BAD_INPUT
        assert len(reply.errors) == 1 and reply.errors[0].startswith(message) and not reply.text
    assert same(alone, good) and not good.errors
    assert busy_after == 0


def test_replies_piling_up_end_that_conversation(tiny_ckpt, voices):
    """A client that does not read its replies is disconnected with a message once more than
    max_outbox wait (0 here, so at the first reply), and its slot is free again."""

    async def main():
        async with serving(tiny_ckpt, 1, max_outbox=0) as (server, url):
            writer = sphn.OpusStreamWriter(SR)
            pages = b"".join(writer.append_pcm(voices[0][f * FRAME : (f + 1) * FRAME]) for f in range(3))
            reply = await bad_client(url, bytes([KIND_AUDIO]) + pages)
            await wait_free(server)
            return reply

    reply = asyncio.run(main())
    assert reply.close_code == CLOSE_POLICY and not reply.text
    assert reply.errors == ["the client does not read what the server sends; disconnecting"]


def test_static_web_ui_and_cli_errors(tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    from finetune.serve import main as serve_main

    assert resolve_static("none") is None
    # The default (moshi's web UI from the Hub) with an empty cache and no network: a clear error.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="cannot fetch moshi's web UI .* or --static none"):
        resolve_static(None)
    with pytest.raises(FileNotFoundError, match="no index.html there"):
        resolve_static(str(tmp_path))
    (tmp_path / "index.html").write_text("<html>moshi web UI</html>")
    (tmp_path / "app.js").write_text("console.log('ok')")
    assert resolve_static(str(tmp_path)) == str(tmp_path)

    async def main():
        async with serving(tiny_ckpt, 1, static=str(tmp_path)) as (_, url):
            base = url.replace("ws://", "http://").removesuffix("/api/chat")
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/") as r:
                    index = (r.status, await r.text())
                async with session.get(base + "/app.js") as r:
                    asset = (r.status, await r.text())
        return index, asset

    index, asset = asyncio.run(main())
    assert index == (200, "<html>moshi web UI</html>") and asset == (200, "console.log('ok')")
    assert serve_main([str(tmp_path / "nope"), "--static", "none"]) == 2
    assert serve_main([str(tiny_ckpt), "--static", str(tmp_path / "missing")]) == 2


def test_under_load_no_slot_leaks_and_every_client_gets_its_answer(tiny_ckpt, tmp_path):
    """The short version of scripts/load_serve.py (the full one: 40 clients over 5 minutes, figures in
    the README): 12 clients over 20 s against 4 slots, every role (talking, reading slowly, dropping
    mid-stream, a bad message, going silent) and a burst of 6 at once, against the real server process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "load.json"
    res = subprocess.run(
        [sys.executable, "scripts/load_serve.py", str(tiny_ckpt), "--clients", "12", "--duration", "20"]
        + ["--json", str(out), "--log", str(tmp_path / "server.log")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr + (tmp_path / "server.log").read_text()[-3000:]
    r = json.loads(out.read_text())
    assert all(r["checks"].values()) and r["clients"] == 12
    assert r["refused"] >= 2 and r["refused_with_busy_message"] == r["refused"]  # the burst: 6 for 4 slots
    assert all(n >= 1 for n in r["admitted_by_role"].values()), r["admitted_by_role"]  # every role was served
    assert r["good_with_audio_and_text"] == r["good"] >= 3
    assert r["slots_free_at_end"] == 4 and r["one_more_refused_at_end"]
    assert r["server_log"]["connected"] == r["server_log"]["left"] == r["admitted"]
    # Flat memory: what one more conversation costs is its Opus codecs and queues (kilobytes); 32 MiB over
    # a dozen conversations would be a leak of megabytes per conversation.
    assert r["rss_mib"]["end"] - r["rss_mib"]["start"] < 32, r["rss_mib"]
    assert "all checks hold" in res.stdout
