"""Building the manifest datasets of a training config."""

from __future__ import annotations

from pathlib import Path

import sentencepiece

from ..schema import ConfigError
from .dataset import CodeSource, ConversationDataset, read_manifest
from .interleave import Interleaver


def resolve_assets(cfg) -> tuple[str, str, str | None]:
    """(tokenizer, mimi weights, mimi config) paths; the Hub checkpoint's own files for model.source hf."""
    d = cfg.data
    tokenizer, mimi, mimi_config = d.tokenizer, d.mimi_weights, d.mimi_config
    if (tokenizer is None or mimi is None) and cfg.model.source == "hf":
        from moshi.models import loaders

        info = loaders.CheckpointInfo.from_hf_repo(
            cfg.model.hf_repo, moshi_weights=cfg.model.moshi_weights, config_path=cfg.model.config_path
        )
        tokenizer = tokenizer or str(info.tokenizer)
        mimi = mimi or str(info.mimi_weights)
    for name, p in (
        ("data.tokenizer", tokenizer),
        ("data.mimi_weights", mimi),
        ("data.mimi_config", mimi_config),
    ):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{name}: {p} does not exist")
    return tokenizer, mimi, mimi_config


def load_tokenizer(path: str, model) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() > model.text_card:
        raise ConfigError(
            f"data.tokenizer: {path} has {sp.vocab_size()} pieces but the model's text_card is {model.text_card}; "
            "use the checkpoint's own tokenizer"
        )
    return sp


def conversation_datasets(cfg, model):
    tokenizer, mimi, mimi_config = resolve_assets(cfg)
    sp = load_tokenizer(tokenizer, model)
    num_codebooks = max(model.dep_q, model.n_q - model.dep_q)
    if 2 * num_codebooks != model.n_q:
        raise ConfigError(
            f"manifest data needs a model with n_q = 2 x Mimi codebooks (Moshi + user), got n_q={model.n_q}, "
            f"dep_q={model.dep_q}"
        )
    interleaver = Interleaver(
        sp,
        text_padding_id=model.text_padding_token_id,
        end_of_text_padding_id=model.end_of_text_padding_id,
        zero_token_id=model.zero_token_id,
        overlap=cfg.data.text_overlap,
    )
    source = CodeSource(mimi, mimi_config, num_codebooks, cfg.data.cache_dir)
    train = ConversationDataset(read_manifest(cfg.data.train), cfg.data.num_frames, interleaver, source)
    evals = None
    if cfg.data.eval:
        evals = ConversationDataset(read_manifest(cfg.data.eval), cfg.data.num_frames, interleaver, source)
    return train, evals
