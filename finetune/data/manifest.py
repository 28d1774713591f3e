"""The conversation datasets of ``data.source: manifest``: the files a config names (tokenizer, Mimi
weights; the Hub checkpoint's own for ``model.source: hf``), the Mimi codebook count the model reads,
and the train / eval :class:`~finetune.data.dataset.ConversationDataset` of the manifests."""

from __future__ import annotations

import json
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


def num_codebooks(n_q: int, dep_q: int) -> int:
    """Mimi codebooks per channel of a Moshi with ``n_q`` audio streams, ``dep_q`` of them its own."""
    return max(dep_q, n_q - dep_q)


def config_num_codebooks(cfg) -> int:
    """The Mimi codebook count the configured model reads, from its config alone (no weights)."""
    m = cfg.model
    init = None
    if m.init_from:  # a full fine-tune's own config.json describes the architecture
        from ..compat.init_from import init_from_files

        init = init_from_files(m.init_from)
    if init is not None and init.full is not None:
        kw = init.config
    elif m.source == "tiny":
        from moshi_ttt.tiny import tiny_lm_kwargs

        kw = tiny_lm_kwargs(**m.tiny)
    else:
        if m.config_path:
            from moshi.models import loaders

            path = Path(loaders.hf_get(m.config_path))
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(m.hf_repo, "config.json"))
        kw = json.loads(path.read_text())
    try:
        return num_codebooks(int(kw["n_q"]), int(kw["dep_q"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the model config has no usable n_q / dep_q ({e})") from None


def conversation_datasets(cfg, model):
    tokenizer, mimi, mimi_config = resolve_assets(cfg)
    sp = load_tokenizer(tokenizer, model)
    codebooks = num_codebooks(model.n_q, model.dep_q)
    if 2 * codebooks != model.n_q:
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
    source = CodeSource(mimi, mimi_config, codebooks, cfg.data.cache_dir)
    train = ConversationDataset(read_manifest(cfg.data.train), cfg.data.num_frames, interleaver, source)
    evals = None
    if cfg.data.eval:
        evals = ConversationDataset(read_manifest(cfg.data.eval), cfg.data.num_frames, interleaver, source)
    return train, evals
