"""Checks of a training config that need the filesystem, run before anything is built or written.

Every file the config names (manifests, tokenizer, Mimi weights and config, base model config and
weights) must exist, and every manifest must hold at least one usable entry, before ``run_dir`` is
created or a model is built, so a mistyped path is one ``config error:`` line and leaves nothing behind.
Paths given as ``hf://`` (and the files ``model.source: hf`` downloads) are not checked here.
"""

from __future__ import annotations

from pathlib import Path

from .data.dataset import read_manifest
from .schema import ConfigError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")


def _local(value: str | None) -> bool:
    return bool(value) and not str(value).startswith("hf://")


def check_moshi_weights(path: str | None, allow_pickle: bool) -> None:
    """moshi loads a non-safetensors (``.pt``) checkpoint with pickle, which can run code stored in the
    file: refused unless ``model.allow_pickle`` is set."""
    if path and not allow_pickle and Path(str(path)).suffix not in SAFETENSORS_SUFFIXES:
        raise ConfigError(
            f"model.moshi_weights: {path} is not a safetensors file; moshi reads such files with pickle, "
            "which can run code stored in them. Convert it to safetensors, or set model.allow_pickle: true "
            "if you trust the file"
        )


def absolute_paths(cfg) -> None:
    """Existing relative file paths of ``cfg`` become absolute, so a saved config works from any directory."""
    for section, keys in (
        (cfg.data, ("train", "eval", "tokenizer", "mimi_weights", "mimi_config", "cache_dir")),
        (cfg.model, ("config_path", "moshi_weights", "init_from")),
        (cfg.data.recall, ("word_codes",)),
    ):
        for key in keys:
            value = getattr(section, key)
            if value and not value.startswith("hf://") and Path(value).exists():
                setattr(section, key, str(Path(value).resolve()))


def check_config_paths(cfg) -> None:
    """ConfigError naming the key of the first file that is missing or unusable."""
    m, d = cfg.model, cfg.data
    files = []
    if m.source == "local":
        files += [("model.config_path", m.config_path), ("model.moshi_weights", m.moshi_weights)]
    elif m.source == "hf":
        files += [
            (k, v)
            for k, v in (("model.config_path", m.config_path), ("model.moshi_weights", m.moshi_weights))
            if _local(v)
        ]
    check_moshi_weights(m.moshi_weights, m.allow_pickle)
    # Manifest data, or the recall task reading audio or conversations from manifests.
    manifests = d.source == "manifest" or (d.source == "recall" and d.recall.reads_manifests)
    if d.source == "recall" and d.recall.facts == "speech":
        files.append(("data.recall.word_codes", d.recall.word_codes))
    if manifests:
        for key in ("tokenizer", "mimi_weights"):
            if getattr(d, key) is None and m.source != "hf":
                raise ConfigError(
                    f"data.{key}: required for manifest data with model.source {m.source} "
                    "(only model.source hf brings its own)"
                )
        files += [("data.train", d.train), ("data.eval", d.eval)]
        files += [(f"data.{k}", getattr(d, k)) for k in ("tokenizer", "mimi_weights", "mimi_config")]
    for key, value in files:
        if _local(value) and not Path(value).is_file():
            what = "is a directory, not a file" if Path(value).is_dir() else "does not exist"
            raise ConfigError(f"{key}: {value} {what}")
    if manifests:
        for key in ("train", "eval"):
            if getattr(d, key):
                read_manifest(getattr(d, key), warn=False)  # ConfigError if it has no usable entry
    if d.cache_dir and Path(d.cache_dir).exists() and not Path(d.cache_dir).is_dir():
        raise ConfigError(f"data.cache_dir: {d.cache_dir} exists and is not a directory")
