"""Moshi's own web UI in a real browser, served by this project (scripts/browser_check.py).

The end-to-end test needs Chromium and moshi's web client (kyutai-labs/moshi's ``client/``, or a
built copy): ``MOSHI_CLIENT`` names it, else ``../shared/moshi-client`` beside the repository is
tried. Building the source needs node and npm (and the npm registry). Where any of these is missing
the test is skipped and says which; the error paths of the script are tested everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "browser_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("browser_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _client() -> tuple[Path | None, str]:
    """moshi's web client to test with, or None and why not."""
    env = os.environ.get("MOSHI_CLIENT")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "moshi-client"]
    for c in candidates:
        if (c / "package.json").is_file() or (c / "index.html").is_file():
            return c, ""
    where = f"MOSHI_CLIENT={env}" if env else f"{candidates[0]} (MOSHI_CLIENT unset)"
    return None, (
        f"moshi's web client not found at {where}: set MOSHI_CLIENT to kyutai-labs/moshi's client/ "
        "directory or a built copy of it"
    )


def test_missing_tools_and_inputs_are_named(tmp_path, capsys, monkeypatch):
    """Exit status 2 and a message saying what is missing and how to get it (no browser needed)."""
    mod = _load_script()
    with monkeypatch.context() as m:
        m.setattr(mod.shutil, "which", lambda name: None)
        with pytest.raises(mod.Missing, match="no Chromium found .* apt-get install chromium"):
            mod.find_chromium(None)
    assert (
        mod.main(["runs/none", "--client", str(tmp_path), "--chromium", str(tmp_path / "no-chromium")]) == 2
    )
    assert "--chromium" in capsys.readouterr().err
    chromium = shutil.which("true")  # an executable: the next checks come after the browser lookup
    assert mod.main([str(tmp_path / "no-run"), "--client", str(tmp_path), "--chromium", chromium]) == 2
    assert "no-run does not exist" in capsys.readouterr().err
    with pytest.raises(mod.Missing, match="neither moshi's client source .* nor a build"):
        mod.resolve_client(tmp_path, tmp_path / "build")
    with pytest.raises(mod.Missing, match="no such directory"):
        mod.resolve_client(tmp_path / "absent", tmp_path / "build")


@pytest.mark.slow
def test_web_ui_in_headless_chromium_shows_moshis_text(request, tmp_path):
    """The page connects, the server logs the conversation, the page shows Moshi's text pieces."""
    mod = _load_script()
    chromium = next((shutil.which(n) for n in mod.CHROMIUM_NAMES if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): needed to drive moshi's web UI")
    client, why = _client()
    if client is None:
        pytest.skip(why)
    if (client / "package.json").is_file() and shutil.which("npm") is None:
        pytest.skip(f"{client} is moshi's client source and npm is not installed to build it")
    # The tiny run is trained only once we know the test can run.
    tiny_ckpt, tiny_ds = request.getfixturevalue("tiny_ckpt"), request.getfixturevalue("tiny_ds")
    shot = tmp_path / "web_ui.png"
    wav = sorted((tiny_ds / "audio").glob("conv_*.wav"))[0]
    cmd = [sys.executable, str(SCRIPT), str(tiny_ckpt), "--client", str(client), "--wav", str(wav)]
    cmd += ["--screenshot", str(shot), "--build-dir", str(tmp_path / "client"), "--min-pieces", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK: moshi's web UI, served by this project, showed Moshi's text" in r.stdout
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == mod.VIEWPORT  # the IHDR chunk: width, height
