"""GPU memory of the Moshi-7B recipes at batch 1 with gradient checkpointing.

    python scripts/memory_7b.py                                    # the shipped 7B configs, estimated
    python scripts/memory_7b.py configs/moshi7b_lora_ttt.yaml --window 3000 6000 9000

Nothing is allocated: the recipe's model (Moshi-7B's architecture, moshi's
own ``_lm_kwargs``, with the config's TTT layers, LoRA and ``model.context``) is built on the meta
device through the trainer's ``build_model``, which gives exact parameter counts per group, and the
activations are estimated from the architecture's shapes (bf16 compute, every transformer layer
checkpointed; breakdown printed). FSDP configs are sharded over ``--gpus``. The estimate leaves out
the CUDA allocator's fragmentation and library workspaces. On a GPU, measure the same model and
window with ``scripts/bench_model.py --config CONFIG --T WINDOW`` (peak memory and step time).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models.loaders import _lm_kwargs

from finetune.args import TrainConfig, load_config
from finetune.training.model import build_model
from moshi_ttt import named_ttt_layers
from moshi_ttt.ops import choose_form

ROOT = Path(__file__).resolve().parents[2]  # the repository
GB = 1e9
RECIPES = [
    "configs/moshi7b_lora_ttt.yaml",
    "configs/moshi7b_lora_ttt_ctx.yaml",
    "configs/moshi7b_full_ttt.yaml",
]


@dataclass
class Estimate:
    name: str
    window: int
    context: int
    parts: dict[str, float]  # bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def meta_model(cfg: TrainConfig) -> torch.nn.Module:
    """The recipe's model with Moshi-7B's architecture on the meta device: shapes only."""
    return build_model(cfg, torch.device("meta"), base=(dict(_lm_kwargs), None)).model


def estimate(
    cfg: TrainConfig, window: int, gpus: int, name: str, lm: torch.nn.Module | None = None
) -> Estimate:
    """Bytes per GPU at batch 1 for a ``window``-step window; ``lm``: ``meta_model(cfg)`` if built."""
    lm = lm if lm is not None else meta_model(cfg)
    k = _lm_kwargs
    d, L, V, card = k["dim"], k["num_layers"], k["text_card"], k["card"]
    h = int(2 * k["hidden_scale"] * d / 3)  # moshi's gated MLP width (11264 for d = 4096)
    dd, dq, dL = k["depformer_dim"], k["dep_q"], k["depformer_num_layers"]
    context = lm.transformer.layers[0].self_attn.context
    T = window
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in lm.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in lm.buffers())
    ttt = dict(named_ttt_layers(lm))
    fsdp = cfg.distributed.strategy == "fsdp"
    shard = gpus if fsdp else 1
    parts: dict[str, float] = {}
    # Weights and optimizer: trainable weights fp32 + grad fp32 + AdamW's two fp32 moments; frozen bf16.
    parts["frozen weights (bf16)"] = 2 * frozen / shard
    parts["trainable weights + grads + AdamW (16 B each)"] = 16 * trainable / shard
    parts["buffers (TTT w_down_pretrained fp32, ...)"] = buffers  # FSDP2 shards parameters only
    if fsdp:  # one layer gathered in bf16 for compute, the next prefetched
        per_layer = sum(p.numel() for p in lm.transformer.layers[0].parameters())
        parts["FSDP: two gathered layers (bf16)"] = 2 * 2 * per_layer
    # Saved for backward across the whole step (bf16 residual stream under autocast / FSDP bf16).
    parts["checkpointed inputs of the main layers"] = L * T * d * 2
    parts["TTT source (text embedding) + final norm"] = 2 * T * d * 2 + T * d * 4
    parts["depformer: checkpointed inputs"] = dL * T * dq * dd * 2 + T * dq * dd * 2
    # The largest transient: the heads' logits and their gradients (bf16, fp32 copy for the CE, fp32
    # grad), or one main layer's recompute + backward; whichever is larger.
    heads = T * V * (2 + 4 + 4) + T * dq * card * (2 + 4 + 4)
    attn = (
        T * d * 4 + T * d * 2 + 3 * T * d * 2 + 2 * T * d * 2 + T * d * 2 + T * T * 1
    )  # norm, qkv, rope, out, mask
    attn_mask_build = T * T * 8  # moshi builds the window mask from an int64 [T, T] difference
    mlp = T * d * 6 + T * 2 * h * 2 + 3 * T * h * 2 + T * d * 2
    ttt_extra = 0.0
    if ttt:
        form = choose_form(T, d, h) if cfg.ttt.fast_form == "auto" else cfg.ttt.fast_form
        scores = (T * T / 2) * 4 if form == "dual" else 2 * d * h * 4  # dual: score tiles; scan: 2 states
        ttt_extra = (
            T * h * 4 + T * d * 4 + 3 * T * d * 2 + scores + T * h * 4 + 2 * T * d * 4
        )  # z, V, conv, bwd
    layer = 2 * (attn + mlp + ttt_extra) + attn_mask_build  # backward holds about as much again
    parts["largest transient: " + ("heads' logits" if heads > layer else "one layer's recompute")] = max(
        heads, layer
    )
    return Estimate(name, T, context, parts)


def print_estimate(e: Estimate) -> None:
    print(
        f"{e.name}: window {e.window} steps ({e.window / 12.5:.0f} s), attention context {e.context}: "
        f"{e.total / GB:.1f} GB per GPU (estimate)"
    )
    for k, v in e.parts.items():
        print(f"    {k:<52s} {v / GB:7.2f} GB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=RECIPES)
    p.add_argument("--window", type=int, nargs="+", help="window lengths in steps (default: the config's)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs an FSDP recipe is sharded over")
    args = p.parse_args()
    for path in args.configs:
        cfg = load_config(
            ROOT / path if not Path(path).is_file() else path, {"model.gradient_checkpointing": True}
        )
        lm = meta_model(cfg)
        for T in args.window or [cfg.data.num_frames]:
            name = Path(path).stem
            est = estimate(cfg, T, args.gpus, name, lm)
            print_estimate(est)
    return 0


if __name__ == "__main__":
    sys.exit(main())
