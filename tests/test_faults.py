"""Fault injection: every fault of issue 13 reproduced, and what must hold after it.

No good checkpoint is lost, the run restarts, and every message names the file (or key) at fault.
Training runs in-process on the small ``tiny_cfg`` model of test_train.py; the exact reproductions of
the issue on ``configs/tiny_synthetic.yaml`` through the CLI are marked slow.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import _copy_ds, _train_cfg
from test_train import losses, tiny_cfg

from finetune.checkpointing import checkpoint_root, list_checkpoints, lock_run_dir
from finetune.data.check import check_manifest
from finetune.schema import ConfigError
from finetune.trainer import Diverged, train

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")


def steps(run) -> list[int]:
    return [s for s, _ in list_checkpoints(run)]


def aside(run, why: str) -> list[Path]:
    return sorted(checkpoint_root(run).glob(f".{why}.*"))


def strict_records(run) -> list[dict]:
    """metrics.jsonl parsed by a strict JSON reader (NaN / Infinity refused)."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x, parse_constant=refuse) for x in lines]


def nan_loss_on(monkeypatch, bad_calls: set[int]) -> None:
    """The training loss of the given (1-based) calls becomes NaN: those steps are non-finite."""
    import finetune.trainer as T

    real, calls = T.training_loss, [0]

    def flaky(opts, out, codes, weights, norms=None):
        parts = real(opts, out, codes, weights, norms)
        calls[0] += 1
        if calls[0] in bad_calls:
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(T, "training_loss", flaky)  # the trainer's training steps, not its evaluation


# ---------------------------------------------------------------- 1. divergence


def test_divergence_writes_no_checkpoint_and_a_relaunch_with_a_sane_setting_continues(tmp_path, capsys):
    run = tmp_path / "run"
    over = {"checkpoint.interval": 1, "checkpoint.keep_last": 1}  # a save due at every step, keep one
    train(tiny_cfg(run, max_steps=4, **over))
    assert steps(run) == [4]
    good = (list_checkpoints(run)[-1][1] / "trainable.safetensors").read_bytes()
    # lr 1e6: step 5 is finite (and saved) but its update breaks the weights: steps 6, 7, 8 are not.
    with pytest.raises(Diverged, match="resumes from checkpoint step_000004"):
        train(tiny_cfg(run, max_steps=20, max_nonfinite_steps=3, **over, **{"optim.lr": 1e6}))
    out = capsys.readouterr().out
    assert "step 6: not saving a checkpoint in a run of non-finite steps" in out
    # Nothing written in the streak; step 5 (the step after it was already non-finite) moved aside; the
    # last checkpoint whose weights gave a finite step is intact although keep_last is 1.
    assert steps(run) == [4]
    assert (list_checkpoints(run)[-1][1] / "trainable.safetensors").read_bytes() == good
    assert [p.name.split(".")[2] for p in aside(run, "suspect")] == ["step_000005"]
    skips = [r for r in strict_records(run) if r["kind"] == "skip"]
    assert [r["in_a_row"] for r in skips] == [1, 2, 3] and skips[0]["grad_norm"] is None  # strict JSON
    # Relaunch with the original lr: resumes from step 4 with a fresh streak count and finishes.
    train(tiny_cfg(run, max_steps=7, **over))
    assert f"resumed from {checkpoint_root(run) / 'step_000004'}" in capsys.readouterr().out
    assert steps(run) == [7]
    records = strict_records(run)
    trained = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(trained) == list(range(1, 8)) and all(v is not None for v in trained.values())
    assert not [r for r in records if r["kind"] == "skip"]  # the diverged attempt's records moved aside
    assert (run / "metrics.superseded.jsonl").is_file()


def test_a_save_due_in_a_streak_waits_and_rotation_keeps_the_checkpoint_before_it(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    nan_loss_on(monkeypatch, {6, 7})  # steps 6 and 7 are non-finite; the save due at 6 waits
    train(tiny_cfg(run, max_steps=10, **{"checkpoint.interval": 3, "checkpoint.keep_last": 1}))
    out = capsys.readouterr().out
    assert "step 6: not saving a checkpoint" in out and "step_000008 in" in out  # deferred to step 8
    assert "step_000006 in" not in out
    # keep_last 1 keeps the newest, and rotation keeps step 3: the last one written before the streak.
    assert steps(run) == [3, 10]
    state = torch.load(list_checkpoints(run)[-1][1] / "trainer_state.pt", weights_only=True)
    assert state["protected_step"] == 3


def test_a_run_that_ends_in_a_streak_fails_without_writing_its_final_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_loss_on(monkeypatch, {5, 6})
    with pytest.raises(Diverged, match="final checkpoint was not written.*step_000003"):
        train(tiny_cfg(run, max_steps=6))
    assert steps(run) == [3] and not aside(run, "suspect")  # step 4 was finite: 3 is vouched for


@pytest.mark.slow
def test_issue_divergence_reproduction_through_the_cli(tmp_path):
    """Issue 13, fault 1, as reported: lr 1e6 after 60 good steps, a checkpoint due every 5 steps."""
    run = tmp_path / "run"
    base = [
        sys.executable,
        "train.py",
        "configs/tiny_synthetic.yaml",
        f"--run_dir={run}",
        "--eval.interval=0",
    ]
    first = subprocess.run(base + ["--max_steps=60", "--checkpoint.interval=10"], cwd=ROOT, env=ENV)
    assert first.returncode == 0 and steps(run) == [50, 60]
    bad = subprocess.run(
        base + ["--max_steps=90", "--checkpoint.interval=5", "--optim.lr=1e6"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "resumes from checkpoint step_000060" in bad.stderr
    assert steps(run) == [50, 60]  # nothing written in the streak, nothing rotated away
    again = subprocess.run(
        base + ["--max_steps=70", "--checkpoint.interval=5"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "step_000060" in again.stdout
    assert steps(run)[-1] == 70


# ---------------------------------------------------------------- 2. a step directory without meta.json


def test_a_step_dir_without_meta_json_is_moved_aside_and_never_blocks_a_save(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=6))  # checkpoints at 3 and 6
    broken = checkpoint_root(run) / "step_000006"
    weights = (broken / "trainable.safetensors").read_bytes()
    (broken / "meta.json").unlink()
    train(tiny_cfg(run, max_steps=6))  # resumes from 3, saves step 6 again
    out = capsys.readouterr().out
    assert "moved" in out and "step_000006 aside to .incomplete.step_000006" in out
    assert steps(run) == [3, 6]
    (kept,) = aside(run, "incomplete")
    assert (kept / "trainable.safetensors").read_bytes() == weights  # moved, not deleted
    train(tiny_cfg(run, max_steps=6))  # and the next launch is fine too
    assert "already at step 6" in capsys.readouterr().out


def test_an_interrupted_save_that_wrote_meta_json_is_kept_aside(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=3))
    root = checkpoint_root(run)
    shutil.copytree(root / "step_000003", root / ".tmp.step_000006")  # complete but never renamed
    shutil.copytree(root / "step_000003", root / ".tmp.step_000009")
    (root / ".tmp.step_000009" / "meta.json").unlink()  # certainly incomplete
    train(tiny_cfg(run, max_steps=6))
    assert steps(run) == [3, 6]
    assert len(aside(run, "incomplete")) == 1 and not list(root.glob(".tmp.*"))


# ---------------------------------------------------------------- 3. resume from an older checkpoint


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside_and_continues(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=9))  # checkpoints 3, 6, 9
    straight = losses(run)
    old9 = (checkpoint_root(run) / "step_000009" / "trainable.safetensors").read_bytes()
    train(tiny_cfg(run, max_steps=9, resume=str(checkpoint_root(run) / "step_000003")))
    out = capsys.readouterr().out
    assert "newer than" in out and "which this run continues from" in out
    assert steps(run) == [3, 6, 9]
    moved = aside(run, "superseded")
    assert [p.name.split(".")[2] for p in moved] == ["step_000006", "step_000009"]
    assert (moved[1] / "trainable.safetensors").read_bytes() == old9  # not overwritten
    replayed = losses(run)
    assert sorted(replayed) == list(range(1, 10))  # each step once in metrics.jsonl
    for s in range(4, 10):
        assert replayed[s] == pytest.approx(straight[s], rel=1e-6), s


# ---------------------------------------------------------------- 4. a corrupt newest checkpoint


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 8)


CORRUPTIONS = {
    "trainable.safetensors": _truncate,
    "trainer_state.pt": _garbage,
    "rng/rank_0.pt": _truncate,
    "config.yaml": lambda p: p.write_text("model: [unclosed\n"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_auto_resume_falls_back_past_a_corrupt_checkpoint_and_names_the_file(tmp_path, capsys, name):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=6))
    capsys.readouterr()
    bad = checkpoint_root(run) / "step_000006"
    CORRUPTIONS[name](bad / name)
    train(tiny_cfg(run, max_steps=9))
    out = capsys.readouterr().out
    assert f"cannot resume from {bad}: {bad / name}: " in out
    assert f"resumed from {checkpoint_root(run) / 'step_000003'}" in out
    assert "weights_only" not in out
    assert steps(run) == [3, 6, 9]
    (moved,) = aside(run, "unloadable")
    assert moved.name.startswith(".unloadable.step_000006.")
    # An explicit resume from a corrupt checkpoint is refused, naming the file, and creates nothing.
    with pytest.raises(ConfigError, match=f"cannot load checkpoint .*{name}") as err:
        train(tiny_cfg(tmp_path / "new", resume=str(moved)))
    assert "weights_only" not in str(err.value) and not (tmp_path / "new").exists()


def test_no_loadable_checkpoint_is_refused_and_nothing_is_deleted(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=3))
    _garbage(checkpoint_root(run) / "step_000003" / "trainer_state.pt")
    with pytest.raises(ConfigError, match="no checkpoint in .* can be loaded"):
        train(tiny_cfg(run, max_steps=6))
    assert steps(run) == [3]


# ---------------------------------------------------------------- 5, 6. bad alignments and manifest bytes


@pytest.mark.parametrize(
    "times, reason",
    [
        (["0.5", "0.9"], r"start and end must be numbers of seconds, got '0.5' and '0.9'"),
        ([float("nan"), 0.9], r"start and end must be numbers of seconds, got nan"),
        ([None, 0.9], r"start and end must be numbers of seconds, got None"),
        ([True, 0.9], r"start and end must be numbers of seconds, got True"),
        ([-0.5, 0.9], r"starts before the audio"),
        ([0.9, 0.5], r"end at or before their start \(dropped from the text stream"),
    ],
)
def test_bad_alignment_times_are_reported_by_the_checker(tiny_ds, tmp_path, times, reason):
    ds = _copy_ds(tiny_ds, tmp_path)
    p = ds / "audio" / "conv_001.json"
    data = json.loads(p.read_text())
    data["alignments"][0][1] = times
    p.write_text(json.dumps(data))  # NaN as the JSON token Python writes
    problems = check_manifest(ds / "train.jsonl")
    assert len(problems) == 1
    assert problems[0].startswith(f"{p}: ") and re.search(reason, problems[0])


def test_a_backwards_word_is_dropped_not_its_file():
    from finetune.data.interleave import parse_alignments

    words = parse_alignments(
        {"alignments": [["a", [0.9, 0.5], "SPEAKER_MAIN"], ["b", [1.0, 1.2], "SPEAKER_MAIN"]]}, "x.json"
    )
    assert [w.text for w in words] == ["a", "b"]  # kept here; the interleaver drops "a" (test_interleave)


def test_bad_alignments_and_manifest_bytes_are_skipped_in_training(tiny_ds, tmp_path, capsys):
    ds = _copy_ds(tiny_ds, tmp_path)
    p = ds / "audio" / "conv_001.json"
    data = json.loads(p.read_text())
    data["alignments"][0][1] = ["1.0", "2.0"]
    p.write_text(json.dumps(data))
    with (ds / "train.jsonl").open("ab") as f:
        f.write(b'{"path": "audio/conv_\xff.wav", "duration": 7.0}\n')
    manifest = ds / "train.jsonl"
    problems = check_manifest(manifest)
    assert f"{manifest}:4: not valid UTF-8 (byte 0xff at column 22)" in "\n".join(problems)
    assert any(x.startswith(f"{p}: alignment #0") for x in problems)
    summary = train(_train_cfg(ds, tmp_path / "run", "train.jsonl", max_steps=6))
    out = capsys.readouterr().out
    assert f"skipping a bad manifest line: {manifest}:4: not valid UTF-8" in out
    assert f"skipping a bad data item: {p}: alignment #0" in out
    assert summary["step"] == 6
    skipped = [r["data/skipped_items"] for r in strict_records(tmp_path / "run") if r["kind"] == "train"]
    # conv_001 has 2 windows of 4 s; over 6 steps both were met, some more than once: counted once each.
    assert max(skipped) == 2


def test_a_non_utf8_alignment_file_is_a_bad_item(tiny_ds, tmp_path):
    from finetune.data.dataset import load_words

    ds = _copy_ds(tiny_ds, tmp_path)
    p = ds / "audio" / "conv_000.json"
    p.write_bytes(p.read_bytes().replace(b"SPEAKER_MAIN", b"SPEAKER_\xe9", 1))
    from finetune.data.audio import BadItem

    with pytest.raises(BadItem, match=f"{p}: not valid UTF-8"):
        load_words(p.with_suffix(".wav"))
    assert any("not valid UTF-8" in x for x in check_manifest(ds / "train.jsonl"))


# ---------------------------------------------------------------- 7. the command line


def _train_py(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """train.py's command line, in-process: (exit status, stdout, stderr)."""
    import runpy

    script = runpy.run_path(str(ROOT / "train.py"), run_name="train_cli")
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as done:
        script["run_main"](script["main"], script["__doc__"])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["extra_arg"], "config error: unexpected argument 'extra_arg'"),
        (["--max_steps", "2", "extra_arg"], "config error: unexpected argument 'extra_arg'"),
        (["--data.train=nope.jsonl"], "config error: data.train: nope.jsonl does not exist"),
        (["--ttt.layers=[9]"], "config error: ttt: "),
    ],
    ids=["stray-argument", "stray-after-a-value", "missing-manifest", "bad-value"],
)
def test_cli_refusals_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    run = tmp_path / "run"
    code, out, err = _train_py(monkeypatch, capsys, "configs/tiny.yaml", f"--run_dir={run}", *args)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert out == "" and not run.exists()  # nothing trained, nothing created


def test_cli_stray_argument_is_refused_at_once_by_the_real_script(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "train.py", "configs/tiny_synthetic.yaml", f"--run_dir={run}", "extra_arg"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.startswith("config error: unexpected argument 'extra_arg'")
    assert "Traceback" not in res.stderr and not run.exists()


# ---------------------------------------------------------------- the run directory


def test_the_lock_is_taken_before_the_resume_check_and_refusals_leave_nothing(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=3))
    held = lock_run_dir(run)
    try:  # a second launch with other settings is told the directory is in use, not a config mismatch
        with pytest.raises(ConfigError, match="is in use by another training process"):
            train(tiny_cfg(run, **{"ttt.layers": [0]}))
    finally:
        held.close()
    with pytest.raises(ConfigError, match="cannot resume: .*ttt.layers"):
        train(tiny_cfg(run, **{"ttt.layers": [0]}))
    assert (run / "config.yaml").read_text() == (list_checkpoints(run)[-1][1] / "config.yaml").read_text()
    # A refused run in a new directory leaves no directory behind.
    ckpt = str(list_checkpoints(run)[-1][1])
    with pytest.raises(ConfigError, match="cannot resume"):
        train(tiny_cfg(tmp_path / "other", resume=ckpt, **{"ttt.layers": [0]}))
    assert not (tmp_path / "other").exists()


def test_checkpoint_files_share_one_mode(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, max_steps=1))
    ckpt = list_checkpoints(run)[-1][1]
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_pt_moshi_weights_are_refused_unless_opted_in(tmp_path):
    from safetensors.torch import load_file

    train(tiny_cfg(tmp_path / "base", max_steps=1, **{"ttt.enabled": False}))
    export = list_checkpoints(tmp_path / "base")[-1][1] / "moshi"
    pt = tmp_path / "model.pt"
    torch.save({"fsdp_best_state": {"model": load_file(str(export / "model.safetensors"))}}, pt)
    over = {
        "max_steps": 1,
        "model.source": "local",
        "model.tiny": {},
        "model.config_path": str(export / "config.json"),
        "model.moshi_weights": str(pt),
    }
    with pytest.raises(
        ConfigError, match="model.moshi_weights: .*model.pt is not a safetensors file.*allow_pickle"
    ):
        train(tiny_cfg(tmp_path / "refused", **over))
    assert not (tmp_path / "refused").exists()
    train(tiny_cfg(tmp_path / "trusted", **over, **{"model.allow_pickle": True}))
    assert steps(tmp_path / "trusted") == [1]


# ---------------------------------------------------------------- the data seams


def test_skip_counts_count_items_not_events():
    from finetune.data import BatchPlan, ResumableLoader

    class OneBad(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return None if i == 5 else torch.full((3, 4), i)

    loader = ResumableLoader(OneBad(), BatchPlan(8, 2, seed=0))
    it = iter(loader)
    for _ in range(4 * 10):  # ten epochs: item 5 met ten times
        next(it)
    assert loader.skipped == 1
    state = loader.state_dict()
    again = ResumableLoader(OneBad(), BatchPlan(8, 2, seed=0))
    again.load_state_dict(state)
    assert again.skipped == 1


def test_a_cache_miss_says_why(tiny_ds, tmp_path, caplog):
    from finetune.data.audio import CodeCache
    from finetune.data.dataset import CodeSource, read_manifest

    audio = read_manifest(tiny_ds / "train.jsonl")[0].path
    CodeCache(tmp_path / "c", tiny_ds / "mimi.safetensors", 8).put(
        audio, torch.zeros(16, 88, dtype=torch.long)
    )
    source = CodeSource(tiny_ds / "mimi.safetensors", tiny_ds / "mimi_config.json", 4, tmp_path / "c")
    with caplog.at_level("WARNING"):
        source.codes(audio)
        source.codes(read_manifest(tiny_ds / "train.jsonl")[1].path)
    misses = [r.getMessage() for r in caplog.records if "is not in the code cache" in r.getMessage()]
    assert len(misses) == 1  # once
    assert "8 codebooks, this model reads 4" in misses[0] and "scripts/encode_codes.py" in misses[0]


def test_the_checker_flags_unknown_words_and_truncated_audio(tiny_ds, tmp_path):
    import sentencepiece

    ds = _copy_ds(tiny_ds, tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ds / "tokenizer.model"))
    p = ds / "audio" / "conv_000.json"
    data = json.loads(p.read_text())
    main = [a for a in data["alignments"] if a[2] == "SPEAKER_MAIN"]
    main[0][0], main[1][0] = "Hello,", "WORLD!"
    p.write_text(json.dumps(data))
    wav = ds / "audio" / "conv_001.wav"
    wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])
    problems = check_manifest(ds / "train.jsonl", sp)
    unk = [x for x in problems if "unknown id" in x]
    assert len(unk) == 1 and "2 of" in unk[0] and "'Hello,'" in unk[0] and "'WORLD!'" in unk[0]
    assert any(
        x.startswith(f"{wav}: truncated: its header announces 7.00 s, it holds 3.50 s") for x in problems
    )
    assert not any("truncated" in x for x in check_manifest(ds / "train.jsonl", decode=False))


# ---------------------------------------------------------------- the run directory's filesystem


def _tmpfs_in_user_namespace() -> str | None:
    """Why a test cannot mount a small tmpfs in a user namespace here (None: it can). Unprivileged (no
    root needed); it fails where user namespaces are disabled, e.g. in some containers."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux)"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            res = subprocess.run(
                ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            return "unshare did not answer"
    return None if res.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {res.stderr.strip()}"


NO_TMPFS = _tmpfs_in_user_namespace()

FS_FAULTS = {
    # name: (shell set-up of the fresh 64 KiB tmpfs at $M, run_dir, expected reason)
    "read-only, new run_dir": ("mount -o remount,ro $M", "$M/runs/a", "its filesystem is read-only, EROFS"),
    "read-only, existing run": (
        "mkdir -p $M/run && echo kept > $M/run/notes && mount -o remount,ro $M",
        "$M/run",
        "its filesystem is read-only, EROFS",
    ),
    "full disk": (
        "dd if=/dev/zero of=$M/fill bs=4k 2>/dev/null || true",
        "$M/runs/a",
        "its disk is full, ENOSPC",
    ),
}


@pytest.mark.skipif(
    NO_TMPFS is not None, reason=f"{NO_TMPFS}; test_a_failed_write_at_start_... covers the path"
)
@pytest.mark.parametrize("fault", sorted(FS_FAULTS))
def test_a_run_dir_on_a_read_only_or_full_filesystem_is_one_line_and_exit_2(tmp_path, fault):
    """A real filesystem fault: a 64 KiB tmpfs mounted in a user namespace (no root needed; chmod would
    not do, since the tests may run as root, whom a read-only mode does not stop), then read-only or full."""
    setup, run_dir, reason = FS_FAULTS[fault]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"set -e; M={mnt}; mount -t tmpfs -o size=64k tmpfs $M; {setup}; set +e; "
        f"{sys.executable} train.py configs/tiny_synthetic.yaml --run_dir={run_dir} 2>{tmp_path}/err; "
        "echo rc=$?; find $M | sort; cat $M/run/notes 2>/dev/null"
    )
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180
    )
    err = (tmp_path / "err").read_text()
    where = run_dir.replace("$M", str(mnt))
    assert "rc=2\n" in res.stdout, res.stdout + res.stderr + err
    assert err.startswith(f"config error: run_dir {where}: cannot write there ({reason}); ")
    assert len(err.strip().splitlines()) == 1 and "Nothing was created or changed" in err
    listing = res.stdout.split("rc=2\n")[1].split()
    expected = {  # what was there before, nothing more: no run directory, .lock or probe file
        "read-only, new run_dir": [str(mnt)],
        "read-only, existing run": [str(mnt), f"{mnt}/run", f"{mnt}/run/notes", "kept"],
        "full disk": [str(mnt), f"{mnt}/fill"],
    }[fault]
    assert listing == expected


def test_a_failed_write_at_start_leaves_nothing_and_is_exit_2(tmp_path, monkeypatch, capsys):
    """The same check with the fault injected at the OS write of the probe (ENOSPC), where a tmpfs
    cannot be mounted: the directories it created are removed again."""
    import errno

    existing = tmp_path / "existing"
    train(tiny_cfg(existing, max_steps=1))
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    real_write = os.write

    def full_disk(fd, data):
        if ".write_test." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    run = tmp_path / "a" / "b" / "run"
    code, out, err = _train_py(monkeypatch, capsys, "configs/tiny_synthetic.yaml", f"--run_dir={run}")
    assert code == 2 and out == ""
    assert err == (
        f"config error: run_dir {run}: cannot write there (its disk is full, ENOSPC); free some space there "
        "or choose another run_dir (--run_dir=...). Nothing was created or changed\n"
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no a/b/run
    # An existing run directory is left exactly as it was.
    with pytest.raises(ConfigError, match="cannot write there"):
        train(tiny_cfg(existing, max_steps=2))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
