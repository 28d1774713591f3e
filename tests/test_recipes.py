"""The Moshi-7B recipes: windows beyond the attention window, the eta docs/long_context.md reasons for, and their
memory estimate."""

import re
from pathlib import Path

import pytest
from moshi.models.loaders import _lm_kwargs

from finetune.args import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("moshi7b_*.yaml"))


def _memory_script():
    from finetune.commands import memory_7b

    return memory_7b


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_7b_recipes_train_on_windows_of_at_least_twice_the_attention_window(path):
    cfg = load_config(path)
    context = cfg.model.context or _lm_kwargs["context"]
    assert cfg.data.num_frames >= 2 * context, (cfg.data.num_frames, context)
    assert cfg.data.num_frames >= 2 * cfg.ttt.chunk_size  # a window holds updates that later chunks read
    assert cfg.model.gradient_checkpointing


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_7b_recipes_use_the_eta_the_docs_reason_for(path):
    doc = (ROOT / "docs" / "long_context.md").read_text()
    m = re.search(r"\*\*The recipes' eta\*\*: `eta_norm: (\w+)`, `eta: ([0-9.e+-]+)`", doc)
    assert m, "docs/long_context.md's Moshi-scale section states the recipes' eta"
    ttt = load_config(path).ttt
    assert (ttt.eta_norm, ttt.eta) == (m[1], float(m[2]))


def test_memory_estimate_counts_the_recipe_on_the_meta_device():
    mem = _memory_script()
    cfg = load_config(ROOT / "configs" / "moshi7b_lora_ttt.yaml")
    lm = mem.meta_model(cfg)
    assert all(p.is_meta for p in lm.parameters())
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in lm.parameters() if not p.requires_grad)
    assert 7.0e9 < frozen < 8.0e9 and 0 < trainable < frozen / 5  # Moshi-7B, LoRA + TTT trainable
    a, b = mem.estimate(cfg, 3000, 8, "a", lm), mem.estimate(cfg, 6000, 8, "b", lm)
    assert a.parts["frozen weights (bf16)"] == 2 * frozen
    assert a.parts["trainable weights + grads + AdamW (16 B each)"] == 16 * trainable
    assert b.parts["checkpointed inputs of the main layers"] == 32 * 6000 * 4096 * 2
    assert 20e9 < a.total < b.total < 80e9  # fits one 80 GB GPU at batch 1
    full = mem.estimate(load_config(ROOT / "configs" / "moshi7b_full_ttt.yaml"), 6000, 8, "full")
    assert full.parts["frozen weights (bf16)"] == 0 and "FSDP: two gathered layers (bf16)" in full.parts
    ctx = load_config(ROOT / "configs" / "moshi7b_lora_ttt_ctx.yaml")
    assert mem.meta_model(ctx).transformer.layers[0].self_attn.context == 750
