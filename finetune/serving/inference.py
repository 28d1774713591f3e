"""Rebuilding a fine-tuned (TTT) Moshi from a checkpoint and streaming conversations through it.

A checkpoint directory (``run_dir/checkpoints/step_NNNNNN``) holds ``moshi/`` (moshi's own layout:
``config.json`` + ``model.safetensors`` and/or ``lora.safetensors``), ``ttt.safetensors`` and the
training ``config.yaml``, which says where Mimi and the tokenizer come from. The model is rebuilt
the way a user without this framework would: moshi's ``CheckpointInfo`` (base from the Hub or the
exported file, plus LoRA), then ``apply_ttt`` + ``load_ttt_weights``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshi_ttt import TTTLMGen, apply_ttt, load_ttt_config, load_ttt_weights, set_ttt_updates

from ..args import TrainConfig, load_config
from ..data.audio import FRAME_RATE
from ..preflight import check_moshi_weights
from ..training.checkpointing import list_checkpoints

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from a run directory (its newest) or a checkpoint path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or a checkpoint directory)")
    if (path / "meta.json").is_file():
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1][1]
    raise ValueError(
        f"{path} is neither a complete checkpoint (no meta.json) nor a run directory with checkpoints"
    )


@dataclass
class LoadedModel:
    lm: torch.nn.Module
    mimi: torch.nn.Module | None
    tokenizer: object | None
    cfg: TrainConfig
    checkpoint: Path
    ttt: bool = field(default=False)


def load_checkpoint_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    with_codec: bool = True,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """The checkpoint's model (LM in ``dtype``: default bf16 on GPU, fp32 on CPU), tokenizer and Mimi."""
    from moshi.models import loaders

    from ..data.audio import load_mimi
    from ..data.manifest import resolve_assets

    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml")
    export = ckpt / "moshi"
    if not (export / "config.json").is_file():
        raise ValueError(
            f"{ckpt} has no moshi export (moshi/config.json): it was trained with checkpoint.export_moshi: false"
        )
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_file = export / "model.safetensors"
    lora_file = export / "lora.safetensors"
    hf_repo = cfg.model.hf_repo if cfg.model.source == "hf" else "local/none"
    if not model_file.is_file():  # moshi reads a .pt base checkpoint with pickle: only if the run opted in
        check_moshi_weights(cfg.model.moshi_weights, cfg.model.allow_pickle)
    info = loaders.CheckpointInfo.from_hf_repo(
        hf_repo,
        moshi_weights=model_file if model_file.is_file() else cfg.model.moshi_weights,
        mimi_weights=model_file,  # placeholders: Mimi and the tokenizer come from the training config
        tokenizer=export / "config.json",
        config_path=export / "config.json",
        lora_weights=lora_file if lora_file.is_file() else None,
    )
    lm = info.get_moshi(device=device, dtype=dtype)
    ttt_file = ckpt / "ttt.safetensors"
    has_ttt = cfg.ttt.enabled
    if has_ttt:
        if not ttt_file.is_file():
            raise FileNotFoundError(f"{ttt_file} is missing: the run trained TTT layers (ttt.enabled: true)")
        apply_ttt(lm, load_ttt_config(ttt_file))
        load_ttt_weights(lm, ttt_file)
    lm.eval()
    if not with_codec:
        return LoadedModel(lm, None, None, cfg, ckpt, has_ttt)
    tokenizer_path, mimi_path, mimi_config = resolve_assets(cfg)
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    num_codebooks = max(lm.dep_q, lm.n_q - lm.dep_q)
    mimi = load_mimi(mimi_path, mimi_config, num_codebooks, device)
    return LoadedModel(lm, mimi, tokenizer, cfg, ckpt, has_ttt)


def read_user_audio(path: str | Path, channel: str = "auto") -> np.ndarray:
    """The user's speech, mono float32 at 24 kHz. Stereo files follow the dataset layout (user = right)."""
    import sphn

    from ..data.audio import SAMPLE_RATE

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input audio not found: {path}")
    wav, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    wav = wav[None] if wav.ndim == 1 else wav
    channels = wav.shape[0]
    if channels == 1 and channel in ("auto", "left", "mono"):
        return wav[0]
    if channels == 2 and channel in ("auto", "right"):
        return wav[1]
    if channels == 2 and channel == "left":
        return wav[0]
    raise ValueError(
        f"{path} has {channels} channel(s): expected mono user speech, or a stereo conversation (left: Moshi, "
        "right: the user, which is what is fed); use --channel left/right to choose"
    )


@dataclass
class StreamResult:
    text_tokens: np.ndarray  # [B, frames] int (Moshi's text stream, un-delayed)
    audio_tokens: np.ndarray  # [B, dep_q, frames]
    audio: np.ndarray  # [B, samples] Moshi's voice decoded by Mimi
    user_tokens: np.ndarray  # [B, num_codebooks, frames] the input as Mimi encoded it, frame by frame
    step_ms: list[float]  # per-frame LM step latency (LMGen.step), ms
    frame_ms: list[float]  # per-frame total latency (Mimi encode + LM + Mimi decode), ms


@dataclass(frozen=True)
class Sampling:
    """How Moshi picks its tokens: moshi's ``LMGen`` arguments, with ``moshi.server``'s defaults (the
    one set of sampling defaults: the server, ``scripts/infer.py`` and the benchmarks read them here)."""

    greedy: bool = False
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25

    def lmgen_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of moshi's ``LMGen`` (and :class:`moshi_ttt.TTTLMGen`)."""
        return dict(
            use_sampling=not self.greedy,
            temp=self.temp,
            temp_text=self.temp_text,
            top_k=self.top_k,
            top_k_text=self.top_k_text,
        )


GREEDY = Sampling(greedy=True)


@torch.no_grad()
def stream_conversations(
    loaded: LoadedModel,
    user_audio: list[np.ndarray] | None = None,
    *,
    user_codes: torch.Tensor | None = None,
    sampling: Sampling = GREEDY,
    ttt_updates: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> StreamResult:
    """Run moshi's LMGen frame by frame over a batch of conversations, each with its own fast weights.

    Give ``user_audio`` (mono 24 kHz arrays, Mimi-encoded frame by frame as in a live conversation) or
    ``user_codes`` (``[B, num_codebooks, frames]``, already encoded). Mimi's streaming encoder is not
    bit-stable across batch sizes (its nearest-code decisions can flip with the batch's float rounding),
    so pass codes to compare runs of different batch sizes exactly.
    """
    from ..data.audio import FRAME_SIZE

    if (user_audio is None) == (user_codes is None):
        raise ValueError("give exactly one of user_audio or user_codes")
    lm, mimi = loaded.lm, loaded.mimi
    device = next(lm.parameters()).device
    if loaded.ttt:
        set_ttt_updates(lm, ttt_updates)
    torch.manual_seed(seed)
    if user_audio is not None:
        B = len(user_audio)
        n_frames = max(int(np.ceil(len(a) / FRAME_SIZE)) for a in user_audio)
        pcm = np.zeros((B, n_frames * FRAME_SIZE), dtype=np.float32)
        for i, a in enumerate(user_audio):
            pcm[i, : len(a)] = a
        x = torch.from_numpy(pcm).to(device)[:, None]  # [B, 1, S]
    else:
        B, _, n_frames = user_codes.shape
        user_codes = user_codes.to(device)
    gen = TTTLMGen(lm, **sampling.lmgen_kwargs())
    text, audio_toks, out_pcm, user_toks, step_ms, frame_ms = [], [], [], [], [], []
    frames = range(n_frames)
    if progress:
        from tqdm import tqdm

        frames = tqdm(frames, unit="frame", desc="streaming")
    # TTTLMGen keeps moshi's CUDA graphs on GPU (chunk-end updates run between graph replays).
    with gen.streaming(B), mimi.streaming(B):
        for f in frames:
            t0 = time.perf_counter()
            if user_codes is None:
                codes = mimi.encode(x[:, :, f * FRAME_SIZE : (f + 1) * FRAME_SIZE])  # [B, nq, 1]
            else:
                codes = user_codes[:, :, f : f + 1]
            user_toks.append(codes[:, :, 0].cpu())
            t1 = time.perf_counter()
            out = gen.step(codes)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if out is not None:
                text.append(out[:, 0, 0].cpu())
                audio_toks.append(out[:, 1:, 0].cpu())
                out_pcm.append(mimi.decode(out[:, 1:]).cpu()[:, 0])
            t3 = time.perf_counter()
            step_ms.append((t2 - t1) * 1e3)
            frame_ms.append((t3 - t0) * 1e3)
    if not text:
        raise ValueError("the input is too short: Moshi produced no frame (need at least a few 80 ms frames)")
    return StreamResult(
        torch.stack(text, 1).numpy(),
        torch.stack(audio_toks, 2).numpy(),
        torch.cat(out_pcm, 1).numpy(),
        torch.stack(user_toks, 2).numpy(),
        step_ms,
        frame_ms,
    )


def text_with_timestamps(
    tokenizer, tokens: np.ndarray, frame_rate: float = FRAME_RATE
) -> list[tuple[float, str]]:
    """Words of Moshi's text stream with the time (s) of their first token; padding ids skipped."""
    words: list[tuple[float, str]] = []
    for f, tok in enumerate(int(t) for t in tokens):
        if tok in (0, 3) or tok < 0 or tok >= tokenizer.vocab_size():
            continue
        piece = tokenizer.id_to_piece(tok)
        if piece.startswith("\u2581") or not words:
            words.append((f / frame_rate, piece.lstrip("\u2581")))
        else:
            t, w = words[-1]
            words[-1] = (t, w + piece)
    return [(t, w) for t, w in words if w]
