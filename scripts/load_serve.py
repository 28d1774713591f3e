#!/usr/bin/env python
"""Load test of the conversation server on the loopback: many clients, few slots, every misbehaviour.

    python scripts/load_serve.py runs/tiny                                  # 40 clients over 5 min, 4 slots
    python scripts/load_serve.py runs/tiny --clients 12 --duration 20       # the short version (a test)

Starts ``scripts/serve.py RUN_OR_CHECKPOINT --host 127.0.0.1`` on a free port (``--static none``,
``--batch-size`` slots), then runs ``--clients`` websocket clients (moshi's protocol, Ogg/Opus through
sphn), arriving over ``--duration`` seconds, with bursts of more clients than slots at once.
Each client has a role, in turn:

- ``talk``: talks in real time (80 ms per frame) for a few seconds, reads everything, closes;
- ``slow_reader``: talks the same way but reads its replies slowly (a pause after each message);
- ``drop``: talks, then cuts its TCP connection mid-stream (no websocket close);
- ``bad``: sends one bad message (a text frame, an unknown kind, bytes that are not Ogg/Opus, an empty
  message, a broken Ogg page; in turn);
- ``stall``: talks for a second, then neither sends nor reads for a few seconds, then closes.

Burst clients all talk. A client that finds every slot busy must get the server's busy message (and
close code 1013). At the end the script checks, and prints:

- every refused client got the busy message;
- every good client (``talk``, ``slow_reader``, ``stall``) got Moshi's voice and text back; each bad
  client got one error message and close code 1003;
- slots free at the end: as many connections as slots, opened together, all get the handshake (one
  more is refused), and the server's log shows as many conversations ended as begun;
- the server's resident memory (RSS, from ``/proc``) at the start, after the first quarter of the
  clients, at the end and at its peak: it stays flat if nothing leaks per conversation.

Everything is bounded: the number of clients (at most 200), each client's time, and the whole run
(``--duration`` plus two minutes); the server is stopped at the end. Exit status 0 when every check
holds, 1 otherwise; ``--json PATH`` also writes the figures. Linux only (RSS from ``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import sphn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.serve import (  # noqa: E402
    CLOSE_BAD_INPUT,
    CLOSE_BUSY,
    KIND_AUDIO,
    KIND_ERROR,
    KIND_HANDSHAKE,
    KIND_TEXT,
)

SR, FRAME = 24000, 1920  # Mimi's sample rate and 80 ms frame
ROLES = ["talk", "slow_reader", "drop", "bad", "stall", "talk", "bad", "drop", "talk", "slow_reader"]
BAD = [  # (message, the start of the error the server must answer with)
    ("a text frame", "expected binary messages, got a text message"),
    (bytes([9]) + b"hello", "unknown message kind 9"),
    (bytes([KIND_AUDIO]) + b"this is not opus", "audio message is not an Ogg/Opus stream"),
    (b"", "empty message"),
    (bytes([KIND_AUDIO]) + b"OggS" + bytes(60), "audio message is not an Ogg/Opus stream"),
]
CLIENT_LIMIT_S = 90.0  # no client lives longer than this
QUIET_S = 2.0  # a client that sent everything leaves after this long without a message


@dataclass
class Client:
    """One client's plan and what happened to it."""

    index: int
    role: str
    start_s: float
    talk_frames: int
    bad: int = 0  # index into BAD
    handshake: bool = False
    refused: bool = False
    frames_sent: int = 0
    audio_frames_back: float = 0.0  # decoded samples / FRAME
    text_pieces: int = 0
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    failure: str = ""  # a client-side exception, if any


def plan_clients(n: int, duration: float, slots: int, seed: int) -> list[Client]:
    """``n`` clients over ``duration`` s. With ``n`` of four bursts' worth or more: three bursts of
    ``slots + 2`` talkers at once (a quarter, half and three quarters in), the others spread evenly with
    jitter. With fewer: the others spread over the first 60 % (each role in turn from ROLES, none
    refused), then one burst at 75 %. Without room for a burst, all spread."""
    rng = random.Random(seed)
    size = slots + 2
    if n >= 4 * size:
        at, spread = [0.25, 0.5, 0.75], 1.0
    elif n >= size + len(set(ROLES)):
        at, spread = [0.75], 0.6
    else:
        at, spread = [], 1.0
    plan = [(f * duration, "talk") for f in at for _ in range(size)]
    rest = n - len(plan)
    plan += [
        ((i + rng.random()) * spread * duration / max(rest, 1), ROLES[i % len(ROLES)]) for i in range(rest)
    ]
    clients, bad = [], 0
    for i, (t, role) in enumerate(sorted(plan, key=lambda x: x[0])):
        seconds = rng.uniform(2.5, 6.0) if duration >= 60 else rng.uniform(2.0, 3.0)
        clients.append(Client(i, role, t, int(seconds * SR / FRAME), bad=bad % len(BAD)))
        bad += role == "bad"
    return clients


def voice(seconds: float, seed: int) -> np.ndarray:
    """A speech-like test signal (a gliding harmonic tone with syllable-rate amplitude and noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * envelope * tone + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


# ---------------------------------------------------------------- clients


async def _first_message(ws, c: Client) -> bool:
    """Handshake (True), or the busy refusal / anything else (False)."""
    msg = await asyncio.wait_for(ws.receive(), 30)
    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == bytes([KIND_HANDSHAKE]):
        c.handshake = True
        return True
    while msg.type == aiohttp.WSMsgType.BINARY:
        if msg.data[:1] == bytes([KIND_ERROR]):
            c.errors.append(msg.data[1:].decode())
        msg = await asyncio.wait_for(ws.receive(), 30)
    c.close_code = ws.close_code
    c.refused = c.close_code == CLOSE_BUSY
    return False


def _take(msg, c: Client, reader) -> None:
    kind, payload = msg.data[0], msg.data[1:]
    if kind == KIND_AUDIO:
        c.audio_frames_back += len(reader.append_bytes(payload)) / FRAME
    elif kind == KIND_TEXT:
        c.text_pieces += 1
    elif kind == KIND_ERROR:
        c.errors.append(payload.decode())


async def _talk(ws, c: Client, audio: np.ndarray, frames: int, read_pause: float, drop: bool) -> None:
    writer, reader = sphn.OpusStreamWriter(SR), sphn.OpusStreamReader(SR)
    done = asyncio.Event()

    async def send() -> None:
        t0 = time.monotonic()
        for f in range(frames):
            opus = writer.append_pcm(audio[f * FRAME : (f + 1) * FRAME])
            if len(opus):
                await ws.send_bytes(bytes([KIND_AUDIO]) + opus)
            c.frames_sent += 1
            await asyncio.sleep(max(0.0, t0 + (f + 1) * FRAME / SR - time.monotonic()))  # real time
        done.set()

    sender = asyncio.create_task(send())
    try:
        while True:
            timeout = QUIET_S if done.is_set() else 30.0
            try:
                msg = await asyncio.wait_for(ws.receive(), timeout)
            except asyncio.TimeoutError:
                break  # everything sent and nothing more came
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            _take(msg, c, reader)
            if drop and done.is_set():
                break
            if read_pause:
                await asyncio.sleep(read_pause)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
    if drop:  # cut the TCP connection: no close frame
        ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)


async def run_client(url: str, c: Client, t0: float) -> Client:
    await asyncio.sleep(max(0.0, t0 + c.start_s - time.monotonic()))
    audio = voice(c.talk_frames * FRAME / SR + 1, seed=c.index)
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url, autoclose=False, max_msg_size=0)
            try:
                if not await _first_message(ws, c):
                    return c
                if c.role in ("talk", "slow_reader", "drop"):
                    frames = c.talk_frames if c.role != "drop" else max(3, c.talk_frames // 2)
                    pause = 0.2 if c.role == "slow_reader" else 0.0
                    await _talk(ws, c, audio, frames, pause, drop=c.role == "drop")
                elif c.role == "stall":
                    await _talk(ws, c, audio, int(SR / FRAME), 0.0, drop=False)  # one second
                    await asyncio.sleep(4.0)  # silent: neither sends nor reads
                elif c.role == "bad":
                    message = BAD[c.bad][0]
                    await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
                    while True:
                        msg = await asyncio.wait_for(ws.receive(), 30)
                        if msg.type != aiohttp.WSMsgType.BINARY:
                            break
                        _take(msg, c, None)
                    c.close_code = ws.close_code
            finally:
                if not ws.closed and c.role != "drop":
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 5)
    except Exception as e:  # a client-side failure is a result too (reported, and it fails the run)
        if c.role != "drop":
            c.failure = f"{type(e).__name__}: {e}"
    return c


async def probe_slots(url: str, slots: int) -> tuple[int, bool]:
    """Open ``slots`` connections together, then one more: (handshakes among the first, extra refused)."""
    async with aiohttp.ClientSession() as session:
        conns = await asyncio.gather(*[session.ws_connect(url) for _ in range(slots)])
        firsts = await asyncio.gather(*[asyncio.wait_for(ws.receive(), 30) for ws in conns])
        got = sum(
            m.type == aiohttp.WSMsgType.BINARY and m.data[:1] == bytes([KIND_HANDSHAKE]) for m in firsts
        )
        extra = Client(-1, "probe", 0.0, 0)
        ws = await session.ws_connect(url)
        await _first_message(ws, extra)
        await ws.close()
        for ws in conns:
            await ws.close()
    return got, extra.refused


# ---------------------------------------------------------------- the server


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, slots: int, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), checkpoint, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--batch-size", str(slots), "--static", "none", "--device", "cpu", *extra]
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def wait_listening(port: int, server: subprocess.Popen, log: Path, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the server did not listen on port {port} within {limit:.0f} s")


def log_counts(text: str) -> dict[str, int]:
    return {
        "connected": len(re.findall(r"slot \d+: .* connected \(", text)),
        "left": len(re.findall(r"slot \d+: .* left after \d+ frames", text)),
        "refused": len(re.findall(r"refused .*: all \d+ conversation slots are busy", text)),
    }


# ---------------------------------------------------------------- the run


async def load(args) -> dict:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/api/chat"
    log = Path(args.log or tempfile.mkstemp(prefix="load_serve_", suffix=".log")[1])
    server = start_server(args.checkpoint, args.slots, port, log, args.server_arg)
    rss: list[tuple[float, float]] = []
    try:
        await wait_listening(port, server, log)
        t0 = time.monotonic()
        rss.append((0.0, rss_mib(server.pid)))

        async def sample() -> None:
            while True:
                await asyncio.sleep(2.0)
                rss.append((time.monotonic() - t0, rss_mib(server.pid)))

        sampler = asyncio.create_task(sample())
        clients = plan_clients(args.clients, args.duration, args.slots, args.seed)
        tasks = [
            asyncio.create_task(asyncio.wait_for(run_client(url, c, t0), c.start_s + CLIENT_LIMIT_S))
            for c in clients
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for c, r in zip(clients, results):
            if isinstance(r, BaseException):
                c.failure = c.failure or f"{type(r).__name__}: {r} (client time limit)"
        quarter = [r for t, r in rss if t <= args.duration / 4][-1]  # the first quarter's last sample
        # The server ends a conversation's bookkeeping shortly after its client leaves: wait for it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = log_counts(log.read_text())
            if counts["left"] >= counts["connected"]:
                break
            await asyncio.sleep(0.5)
        counts = log_counts(log.read_text())
        free, extra_refused = await probe_slots(url, args.slots)
        end_rss = rss_mib(server.pid)
        sampler.cancel()
        elapsed = time.monotonic() - t0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return report(args, clients, counts, free, extra_refused, rss, quarter, end_rss, elapsed, log)


def report(args, clients, counts, free, extra_refused, rss, quarter_rss, end_rss, elapsed, log) -> dict:
    good_roles = ("talk", "slow_reader", "stall")
    refused = [c for c in clients if c.refused]
    admitted = [c for c in clients if c.handshake]
    good = [c for c in admitted if c.role in good_roles]
    bad = [c for c in admitted if c.role == "bad"]
    busy = f"all {args.slots} conversation slots are busy; try again later"
    checks = {
        "every client was admitted or refused": all(c.handshake or c.refused for c in clients),
        "every refused client got the busy message": all(c.errors == [busy] for c in refused)
        and bool(refused),
        "every good client got audio and text back": all(
            c.audio_frames_back >= 1 and c.text_pieces >= 1 and not c.errors for c in good
        )
        and bool(good),
        "every bad client got one error and close 1003": all(
            len(c.errors) == 1 and c.errors[0].startswith(BAD[c.bad][1]) and c.close_code == CLOSE_BAD_INPUT
            for c in bad
        ),
        "no client failed on its side": not [c for c in clients if c.failure],
        "slots free at the end": free == args.slots and extra_refused,
        "every conversation the server began it ended": counts["left"]
        == counts["connected"]
        == len(admitted),
    }
    out = {
        "clients": len(clients),
        "slots": args.slots,
        "duration_s": round(elapsed, 1),
        "admitted": len(admitted),
        "admitted_by_role": {r: sum(c.role == r for c in admitted) for r in dict.fromkeys(ROLES)},
        "refused": len(refused),
        "refused_with_busy_message": sum(c.errors == [busy] for c in refused),
        "good": len(good),
        "good_with_audio_and_text": sum(c.audio_frames_back >= 1 and c.text_pieces >= 1 for c in good),
        "audio_frames_back_per_sent": round(
            sum(c.audio_frames_back for c in good) / max(1, sum(c.frames_sent for c in good)), 3
        ),
        "text_pieces_min_max": [
            min((c.text_pieces for c in good), default=0),
            max((c.text_pieces for c in good), default=0),
        ],
        "bad_answered": sum(len(c.errors) == 1 and c.close_code == CLOSE_BAD_INPUT for c in bad),
        "bad": len(bad),
        "slots_free_at_end": free,
        "one_more_refused_at_end": extra_refused,
        "server_log": counts,
        "rss_mib": {
            "start": round(rss[0][1], 1),
            "first_quarter": round(quarter_rss, 1),
            "end": round(end_rss, 1),
            "max": round(max([r for _, r in rss] + [end_rss]), 1),
        },
        "failures": [f"client {c.index} ({c.role}): {c.failure}" for c in clients if c.failure],
        "checks": checks,
        "ok": all(checks.values()),
        "server_log_file": str(log),
        "client_details": [asdict(c) for c in clients],
    }
    return out


def print_report(r: dict) -> None:
    m = r["rss_mib"]
    roles = ", ".join(f"{k} {v}" for k, v in r["admitted_by_role"].items())
    lines = [
        f"load_serve: {r['clients']} clients in {r['duration_s']} s against {r['slots']} slots (loopback)",
        f"  admitted {r['admitted']} ({roles}), refused {r['refused']}",
        f"  refused clients with the busy message: {r['refused_with_busy_message']}/{r['refused']}",
        f"  good clients with audio and text back: {r['good_with_audio_and_text']}/{r['good']} "
        f"(audio frames back per frame sent {r['audio_frames_back_per_sent']}, text pieces "
        f"{r['text_pieces_min_max'][0]}-{r['text_pieces_min_max'][1]} per client)",
        f"  bad clients answered with one error and close 1003: {r['bad_answered']}/{r['bad']}",
        f"  slots free at the end: {r['slots_free_at_end']}/{r['slots']} (one more refused: "
        f"{r['one_more_refused_at_end']})",
        f"  server log: {r['server_log']['connected']} conversations begun, {r['server_log']['left']} ended, "
        f"{r['server_log']['refused']} refused",
        f"  server RSS (MiB): start {m['start']}, after the first quarter {m['first_quarter']}, end {m['end']}, "
        f"max {m['max']}",
    ]
    lines += [f"  client failure: {f}" for f in r["failures"]]
    lines += [f"  FAILED: {k}" for k, ok in r["checks"].items() if not ok]
    lines.append("  all checks hold" if r["ok"] else "  some checks failed")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="load_serve.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run directory or checkpoint (as for scripts/serve.py)")
    p.add_argument("--clients", type=int, default=40, help="clients in all (at most 200)")
    p.add_argument("--slots", type=int, default=4, help="the server's --batch-size")
    p.add_argument(
        "--duration", type=float, default=300.0, help="seconds over which clients arrive (<= 3600)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--log", default=None, help="the server's log file (default: a temporary file)")
    p.add_argument("--server-arg", action="append", default=[], help="one more argument for scripts/serve.py")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 200 or not 1 <= args.slots <= 64 or not 0 < args.duration <= 3600:
        p.error("--clients must be in [1, 200], --slots in [1, 64], --duration in (0, 3600]")
    try:
        r = asyncio.run(asyncio.wait_for(load(args), args.duration + CLIENT_LIMIT_S + 300))
    except (RuntimeError, asyncio.TimeoutError) as e:
        print(f"error: {e or 'the run did not end in time'}", file=sys.stderr)
        return 1
    print_report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
