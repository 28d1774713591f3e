#!/usr/bin/env python
"""Moshi's own web UI, served by this project, in a real (headless) Chromium, end to end.

    python scripts/browser_check.py runs/tiny --client ../moshi/client --screenshot docs/web_ui.png
    python scripts/browser_check.py runs/tiny --client path/to/dist --wav my_voice.wav

``--client`` is kyutai-labs/moshi's ``client/`` directory (the web UI that ``moshi.server`` serves;
it is copied to a scratch directory and built there with ``npm ci && npm run build``) or an already
built copy (a directory with ``index.html`` and no ``package.json``, e.g. that build's ``dist/``).

What it does: starts ``scripts/serve.py RUN --static DIST`` on a free loopback port (one slot),
starts Chromium headless with a fake microphone that plays ``--wav`` in a loop (mono speech, or a
stereo conversation in the dataset layout whose right channel is the user; default: the user
channel of the run's first eval or train conversation, else a synthetic voiced signal), opens the
page, clicks its Connect button, waits until Moshi's text shows in the page, saves a screenshot,
disconnects and stops the server. The browser is driven over the Chrome DevTools protocol
(aiohttp's websocket client; no browser download, no node package).

Checks (exit status 1 with the reason otherwise): the page connects (the server's handshake turns
its status dot green), the page shows at least ``--min-pieces`` text pieces, every one a
piece of the run's tokenizer (so it is the model's text stream, not some other string), and the
server logs the conversation (a slot connected, then left after a number of frames > 0).
Exit status 2: a missing tool or input (Chromium, npm, the client, the run).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags needed for a headless Chromium in a container (no sandbox, no GPU, nothing fetched from
# Google's servers) plus the fake microphone and the automatic "allow" of its permission prompt.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
)
VIEWPORT = (1024, 720)


class CheckFailed(Exception):
    """The end-to-end check failed (exit status 1)."""


class Missing(Exception):
    """A tool or an input is missing (exit status 2)."""


def log(msg: str) -> None:
    print(f"[browser_check] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- client
def find_chromium(explicit: str | None) -> str:
    if explicit is not None:
        if shutil.which(explicit) is None:
            raise Missing(f"--chromium {explicit}: not an executable")
        return shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    raise Missing(
        "no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "); on Debian/Ubuntu: "
        "apt-get install chromium, or pass --chromium PATH"
    )


def is_client_source(path: Path) -> bool:
    return (path / "package.json").is_file()


def build_client(src: Path, build_dir: Path) -> Path:
    """Copy moshi's client source to ``build_dir`` and build it there; the built UI directory."""
    npm = shutil.which("npm")
    if npm is None:
        raise Missing(f"{src} is the web UI's source: building it needs node and npm (apt-get install npm)")
    if build_dir.exists():
        shutil.rmtree(build_dir)
    shutil.copytree(src, build_dir, ignore=shutil.ignore_patterns("node_modules", "dist"))
    for p in [build_dir, *build_dir.rglob("*")]:  # a read-only source tree stays read-only when copied
        p.chmod(p.stat().st_mode | 0o200)
    for cmd in (["ci", "--no-audit", "--no-fund"], ["run", "build"]):
        log(f"npm {' '.join(cmd)} in {build_dir}")
        t0 = time.monotonic()
        r = subprocess.run([npm, *cmd], cwd=build_dir, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr)[-3000:]
            raise CheckFailed(f"npm {' '.join(cmd)} failed (exit {r.returncode}) in {build_dir}:\n{tail}")
        log(f"  done in {time.monotonic() - t0:.0f} s")
    dist = build_dir / "dist"
    if not (dist / "index.html").is_file():
        raise CheckFailed(f"npm run build finished but {dist}/index.html is missing")
    return dist


def resolve_client(client: Path, build_dir: Path) -> Path:
    if not client.is_dir():
        raise Missing(f"--client {client}: no such directory (moshi's client/ source or a built copy)")
    if is_client_source(client):
        return build_client(client, build_dir)
    if (client / "index.html").is_file():
        return client
    raise Missing(f"--client {client}: neither moshi's client source (package.json) nor a build (index.html)")


# ----------------------------------------------------------------------------------------------- audio
def synthetic_voice(seconds: float = 6.0, sr: int = 24000) -> np.ndarray:
    """A voiced, speech-like signal: harmonics of a gliding 110-160 Hz pitch, ~4 syllables a second."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 135 + 25 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * math.pi * 2.0 * t), 0, None) ** 0.5
    return (0.25 * voice * envelope / np.abs(voice).max()).astype(np.float32)


def write_wav(path: Path, pcm: np.ndarray, sr: int = 24000) -> None:
    """Mono 16-bit PCM, the format Chromium's fake audio capture reads."""
    data = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(data.tobytes())


# ---------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(
                f"the server exited with status {proc.returncode} before listening:\n{tail(log_path)}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise CheckFailed(f"the server did not listen on port {port} within {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: Path, n: int = 30) -> str:
    """The last ``n`` lines of a log, without aiohttp's access log (one line per HTTP request)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join([line for line in lines if "aiohttp.access" not in line][-n:])


def stop_process(
    proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 15.0, group: bool = False
) -> None:
    """Stop ``proc`` with ``sig`` (SIGKILL after ``timeout``); ``group``: then whatever is left of its
    process group (Chromium's renderer and utility processes, started in a session of their own)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ DevTools protocol
class DevTools:
    """A minimal Chrome DevTools protocol client over one page target's websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self._id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import aiohttp

        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"]["args"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(f"console.{data['params']['type']}: {text}")
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.console.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")

    async def call(self, method: str, timeout: float = 30.0, **params):
        self._id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._id] = fut
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise CheckFailed(f"DevTools {method} failed: {reply['error']}")
        return reply["result"]

    async def js(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise CheckFailed(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        self._reader.cancel()

    def console_tail(self, n: int = 12) -> str:
        return "--- the page's console (last lines):\n" + ("\n".join(self.console[-n:]) or "(nothing logged)")


def devtools_port(user_data_dir: Path, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """Chromium writes the port it chose (--remote-debugging-port=0) to DevToolsActivePort."""
    f = user_data_dir / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"Chromium exited with status {proc.returncode} at start")
        if f.is_file():
            lines = f.read_text().split()
            if lines:
                return int(lines[0])
        time.sleep(0.1)
    raise CheckFailed(f"Chromium did not open its DevTools port within {timeout:.0f} s")


BUTTON_JS = """(() => {
  const b = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === %s);
  if (!b) return null;
  const r = b.getBoundingClientRect();
  return {x: r.x + r.width / 2, y: r.y + r.height / 2};
})()"""

STATE_JS = """(() => {
  const box = document.querySelector('.player-text');
  const dot = document.querySelector('.controls .rounded-full');
  const buttons = [...document.querySelectorAll('button')].map(b => b.textContent.trim());
  return {
    pieces: box ? [...box.querySelectorAll('span')].map(s => s.textContent) : null,
    connected: !!(dot && dot.classList.contains('bg-green-700')),
    over: buttons.includes('Start Over'),
    buttons: buttons,
  };
})()"""


async def click(page: DevTools, label: str, timeout: float) -> None:
    """A real mouse click (a user gesture: the page's AudioContext may start) on the button ``label``."""
    deadline = time.monotonic() + timeout
    while (pos := await page.js(BUTTON_JS % json.dumps(label))) is None:
        if time.monotonic() > deadline:
            raise CheckFailed(
                f"no '{label}' button in the page after {timeout:.0f} s:\n{page.console_tail()}"
            )
        await asyncio.sleep(0.25)
    for kind in ("mousePressed", "mouseReleased"):
        await page.call(
            "Input.dispatchMouseEvent", type=kind, x=pos["x"], y=pos["y"], button="left", clickCount=1
        )


async def drive(url: str, devtools: int, args, screenshot: Path) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{devtools}/json/list") as r:
            targets = await r.json()
        page_target = next((t for t in targets if t.get("type") == "page"), None)
        if page_target is None:
            raise CheckFailed(f"Chromium has no page target: {targets}")
        async with http.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = DevTools(ws)
            await page.call("Runtime.enable")
            await page.call("Page.enable")
            w, h = VIEWPORT
            await page.call(
                "Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False
            )
            log(f"opening {url}")
            await page.call("Page.navigate", url=url)
            await click(page, "Connect", timeout=30.0)
            log("clicked Connect; waiting for Moshi's text")
            t0 = time.monotonic()
            state: dict = {}
            connected_at = None
            while True:
                state = await page.js(STATE_JS)
                if state["connected"] and connected_at is None:
                    connected_at = time.monotonic() - t0
                    log(f"connected (handshake) after {connected_at:.1f} s")
                pieces = state["pieces"] or []
                if len(pieces) >= args.min_pieces:
                    break
                if state["over"]:
                    raise CheckFailed(
                        "the page's conversation ended before Moshi's text showed "
                        f"({len(pieces)} pieces):\n{page.console_tail()}"
                    )
                if time.monotonic() - t0 > args.timeout:
                    raise CheckFailed(
                        f"{len(pieces)} text piece(s) in the page after {args.timeout:.0f} s "
                        f"(wanted {args.min_pieces}; connected: {state['connected']}). If the server "
                        "logged the conversation, the model answered with padding only: try --wav with "
                        f"speech like its training data, or a longer --timeout.\n{page.console_tail()}"
                    )
                await asyncio.sleep(0.5)
            state["seconds_to_text"] = time.monotonic() - t0
            state["connected_at"] = connected_at
            shot = await page.call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            log(f"screenshot: {screenshot} ({screenshot.stat().st_size // 1024} KiB)")
            await click(page, "Disconnect", timeout=10.0)
            await asyncio.sleep(1.0)
            page.close()
            return state


# ------------------------------------------------------------------------------------------------ main
def run_config(run: Path):
    from finetune.args import load_config
    from finetune.inference import resolve_checkpoint

    return load_config(resolve_checkpoint(run) / "config.yaml")


def tokenizer_pieces(cfg) -> set[str]:
    """The run's text pieces as the server sends them (SentencePiece's word marker as a space)."""
    import sentencepiece

    from finetune.data.build import resolve_assets

    sp = sentencepiece.SentencePieceProcessor(model_file=str(resolve_assets(cfg)[0]))
    return {sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.vocab_size())}


def microphone_audio(cfg, wav: str | None) -> tuple[np.ndarray, str]:
    """What the fake microphone plays: ``wav``, else the user channel of the first conversation of
    the run's eval (or train) manifest (speech like what the model learned to answer), else a
    synthetic voiced signal."""
    from finetune.data.dataset import scan_manifest
    from finetune.inference import read_user_audio

    if wav is not None:
        return read_user_audio(wav), wav
    for manifest in (cfg.data.eval, cfg.data.train):
        if cfg.data.source == "manifest" and manifest and Path(manifest).is_file():
            entries, _ = scan_manifest(manifest)
            if entries and entries[0].path.is_file():
                return read_user_audio(entries[0].path), f"{entries[0].path} (user channel)"
    return synthetic_voice(), "a synthetic voiced signal"


def check(args, work: Path) -> None:
    chromium = find_chromium(args.chromium)
    run = Path(args.run)
    if not run.exists():
        raise Missing(f"{run} does not exist (a run directory or checkpoint, e.g. what `make tiny` trains)")
    cfg = run_config(run)
    pieces_vocab = tokenizer_pieces(cfg)
    dist = resolve_client(Path(args.client), Path(args.build_dir) if args.build_dir else work / "client")
    log(f"web UI: {dist}")

    wav = work / "mic.wav"
    pcm, source = microphone_audio(cfg, args.wav)
    write_wav(wav, pcm)
    log(f"microphone: {source}, {len(pcm) / 24000:.1f} s, looped")

    port = free_port()
    server_log = work / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), str(run), "--static", str(dist)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--batch-size", "1", "--device", "cpu"]
    log("server: " + " ".join(cmd))
    with open(server_log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    browser = None
    try:
        wait_listening(port, server, server_log, timeout=args.server_timeout)
        profile = work / "profile"
        flags = [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}", f"--user-data-dir={profile}"]
        flags += ["--remote-debugging-port=0", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
        browser_log = work / "chromium.log"
        with open(browser_log, "w") as out:
            browser = subprocess.Popen(
                [chromium, *flags], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            state = asyncio.run(
                drive(
                    f"http://127.0.0.1:{port}/", devtools_port(profile, browser), args, Path(args.screenshot)
                )
            )
        except CheckFailed as e:
            raise CheckFailed(f"{e}\n--- server log (last lines):\n{tail(server_log, 12)}") from None
    finally:
        if browser is not None:
            stop_process(browser, signal.SIGTERM, group=True)
        stop_process(server)
    if state["connected_at"] is None:
        raise CheckFailed("text showed but the page's status dot never turned green (no handshake seen)")
    text_pieces = state["pieces"]
    foreign = [p for p in text_pieces if p not in pieces_vocab]
    if foreign:
        raise CheckFailed(f"text in the page that is not a piece of the run's tokenizer: {foreign[:10]}")
    server_text = Path(server_log).read_text(errors="replace")
    joined = re.search(r"slot \d+: 127\.0\.0\.1 connected", server_text)
    left = re.search(r"slot \d+: 127\.0\.0\.1 left after (\d+) frames \(([\d.]+) s\)", server_text)
    if not joined or not left or int(left.group(1)) == 0:
        raise CheckFailed(
            f"the server did not log a conversation (connected, then left after N > 0 frames):\n{tail(server_log)}"
        )
    text = "".join(text_pieces)
    log(f"server: {joined.group(0)}; {left.group(0)}")
    log(
        f"page: connected after {state['connected_at']:.1f} s, {len(text_pieces)} text pieces after "
        f"{state['seconds_to_text']:.1f} s: {text.strip()[:120]!r}"
    )
    log("OK: moshi's web UI, served by this project, showed Moshi's text")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="browser_check.py",
        description="Moshi's web UI, served by this project, in headless Chromium: connect, wait for Moshi's text, screenshot.",
    )
    p.add_argument("run", help="a run directory or checkpoint with a tokenizer and a Mimi (e.g. runs/tiny)")
    p.add_argument(
        "--client", required=True, help="moshi's client/ source (built here with npm) or a built copy"
    )
    p.add_argument(
        "--build-dir", default=None, help="where to build the client (default: a temporary directory)"
    )
    p.add_argument(
        "--wav",
        default=None,
        help="the microphone's audio, mono or a stereo conversation (user: right); default: the user "
        "channel of the run's first eval (or train) conversation, else a synthetic voiced signal",
    )
    p.add_argument("--screenshot", default="runs/browser_check.png", help="where to save the screenshot")
    p.add_argument("--chromium", default=None, help="Chromium's executable (default: found on PATH)")
    p.add_argument("--min-pieces", type=int, default=12, help="text pieces the page must show")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the text after Connect")
    p.add_argument("--server-timeout", type=float, default=180.0, help="seconds for the server to start")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, profile, build)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="browser_check_"))
    try:
        check(args, work)
        return 0
    except Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"(logs in {work})" if args.keep else "(rerun with --keep to keep the logs)", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
