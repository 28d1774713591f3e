#!/usr/bin/env python
"""Do a model's MLP keys say *which* fact is asked? A diagnostic for the conversational-memory benchmark.

    python scripts/key_binding.py runs/convmem_ft --eval-config configs/convmem_ft.yaml [--items 32]

In-Place TTT writes ``z_t^T v_t`` into each TTT layer's fast weight ``w_down`` and reads it back with
the key ``z`` of a later frame, where ``z = silu(x W_gate) * (x W_up)`` are the layer's MLP
activations. A far question can only be answered if ``z`` at the answer frame points at the frames
where *that* fact was stated, and not at the frames of the conversation's other facts. For every main
layer this prints the mean centred cosine (``z`` minus its mean over the sequence) between ``z`` at each
far answer's frame and ``z`` at the frames of each far statement's key and value (offsets 0-4 from the
key's first frame), for the same fact and for the other facts of the conversation:

- about 0 / 0: the layer's activations carry nothing shared between statement and question;
- high / equally high: "a fact is here" with no identity: the fast weight returns some fact's value,
  the plateau where far answers are another fact of the conversation;
- high / about 0: the key is bound to its fact: the fast weight can return the right value.

The eval set is ``--eval-config``'s recall data (``data.recall.facts: audio`` or ``speech``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

OFFSETS = 5


def mlp_keys(gating: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Moshi's gated-MLP activations ``silu(x W_gate) * (x W_up)`` of ``x [B, T, d]``."""
    h = torch.nn.functional.linear(x, gating.linear_in.weight)
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def centred_cosines(
    z: torch.Tensor, answers: list[int], statements: list[int]
) -> dict[tuple[int, bool], list[float]]:
    """``z [T, H]`` of one sequence; ``answers[i]`` the frame of far fact ``i``'s answer, ``statements[i]``
    the first frame of its key in the statement. Cosines by (offset, same fact)."""
    zc = z - z.mean(0)
    zc = zc / zc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out: dict[tuple[int, bool], list[float]] = {}
    for i, a in enumerate(answers):
        for j, s in enumerate(statements):
            for off in range(OFFSETS):
                out.setdefault((off, i == j), []).append(float(zc[a] @ zc[s + off]))
    return out


def far_facts(task, index: int) -> tuple[list[int], list[int]]:
    """Answer frames and key-statement frames of item ``index``'s far facts, in the same order."""
    queries, spoken = task.spoken_layout(index)
    far = [q for q in queries if q.far]
    # Far facts are stated first, each as three words (DEF, key, value); far questions keep that order.
    return [q.value_pos for q in far], [spoken[3 * i + 1][0] for i in range(len(far))]


def main() -> None:
    from finetune.args import load_config
    from finetune.data.recall import recall_datasets
    from finetune.inference import load_checkpoint_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory (its newest checkpoint) or a checkpoint directory")
    ap.add_argument("--eval-config", required=True, help="a config whose data section is the benchmark")
    ap.add_argument("--items", type=int, default=32)
    args = ap.parse_args()

    lm = load_checkpoint_model(args.run, with_codec=False).lm.eval()
    cfg = load_config(args.eval_config)
    if cfg.data.source != "recall" or cfg.data.recall.facts == "text":
        sys.exit(f"error: {args.eval_config}: needs data.source recall with facts audio or speech")
    _, task = recall_datasets(cfg, lm)
    task = getattr(task, "recall", task)
    keys: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(lm.transformer.layers):
        layer.gating.register_forward_pre_hook(lambda m, inp, i=i: keys.__setitem__(i, mlp_keys(m, inp[0])))
    cos: dict[tuple[int, int, bool], list[float]] = {}
    n = min(args.items, len(task))
    with torch.no_grad():
        for start in range(0, n, 8):
            idx = list(range(start, min(n, start + 8)))
            lm(torch.stack([task[j] for j in idx]))
            for b, j in enumerate(idx):
                answers, statements = far_facts(task, j)
                for li, z in keys.items():
                    for (off, same), v in centred_cosines(z[b], answers, statements).items():
                        cos.setdefault((li, off, same), []).append(statistics.mean(v))
    print(f"{args.run}: mean centred cosine of z at far answers with z at statements, same / other fact")
    print("| layer | " + " | ".join(f"key +{o}" for o in range(OFFSETS)) + " |")
    print("|---|" + "---|" * OFFSETS)
    for li in sorted(keys):
        row = [
            f"{statistics.mean(cos[li, o, True]):+.2f} / {statistics.mean(cos[li, o, False]):+.2f}"
            for o in range(OFFSETS)
        ]
        print(f"| {li} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
