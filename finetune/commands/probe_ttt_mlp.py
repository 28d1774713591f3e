"""In-context associative recall with a TTT-MLP layer alone (no attention, no Moshi around it).

    python scripts/probe_ttt_mlp.py [--steps 1500] [--eta 1.0] [--chunk 4] [--qk-norm] [--no-updates]

Each sequence writes ``--pairs`` random key -> value associations, one per token (the token's input is
the key's embedding plus the value's), then ``--gap`` filler tokens, then queries every key once, in a
new order (the query token holds the key's embedding only); the model must name the value. With
``--split`` a write is two tokens, the key's then the value's, and a learned map of the previous token is
added to each token (what a previous-token attention head gives a TTT layer in a transformer), so the
model must learn to bind them. Keys and values are drawn afresh per
sequence, so only what the layer's fast weights learned from the writes can answer: a layer with its
updates off is at chance (``1 / num_values``). Queries start at a chunk boundary after the writes, so
every answer crosses at least one inner update.

The model is ``readout(TTTMLP(x))`` with the layer's own MLP zeroed (only the TTT-MLP branch
speaks), trained by AdamW on the cross-entropy at the query tokens. Prints the training curve, the
query accuracy on held-out sequences with updates on and off, and the inner loss along the sequence
(``1/2 ||LN(f_W(k)) - (v - k)||^2`` of the write tokens under the weights before and after each chunk).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from moshi_ttt import TTTMLP, TTTConfig


class Probe(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        d = args.dim
        self.key_emb = nn.Embedding(args.num_keys, d)
        self.val_emb = nn.Embedding(args.num_values, d)
        self.pad_emb = nn.Parameter(torch.randn(d))
        lin_in, lin_out = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d, bias=False)
        nn.init.zeros_(lin_out.weight)
        lin_in.requires_grad_(False), lin_out.requires_grad_(False)
        cfg = TTTConfig(
            variant="mlp", chunk_size=args.chunk, eta=args.eta, mlp_heads=args.heads, mlp_qk_norm=args.qk_norm
        )
        self.ttt = TTTMLP(lin_in, lin_out, F.silu, d, cfg)
        with torch.no_grad():
            self.ttt.alpha.fill_(args.gate_init)  # the probe has nothing else: start with the gate open
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, args.num_values)
        # --split: what attention would give the layer, each token plus a learned map of the one before.
        self.prev = nn.Linear(d, d, bias=False) if args.split else None

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.prev is None:
            return x
        return x + self.prev(F.pad(x, (0, 0, 1, 0))[:, :-1])  # [B, T, d]: token t sees t - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.norm(self.ttt(self.layer_input(x))))


def batch(args: argparse.Namespace, model: Probe, B: int, g: torch.Generator):
    """Inputs ``[B, T, d]``, query value targets ``[B, P]`` and the query positions."""
    P, C = args.pairs, args.chunk
    keys = torch.stack([torch.randperm(args.num_keys, generator=g)[:P] for _ in range(B)])  # [B, P]
    vals = torch.randint(0, args.num_values, (B, P), generator=g)
    order = torch.stack([torch.randperm(P, generator=g) for _ in range(B)])  # query order
    if args.split:  # the key's token, then the value's: the layer must bind them across tokens
        writes = torch.stack([model.key_emb(keys), model.val_emb(vals)], 2).flatten(1, 2)  # [B, 2P, d]
    else:
        writes = model.key_emb(keys) + model.val_emb(vals)  # [B, P, d]
    W = writes.shape[1]
    gap = args.gap + (-(W + args.gap)) % C  # queries start on a chunk boundary after the filler
    # Filler between writes and queries: one learned token, with noise (what every update in between
    # sees, like the PAD stretches of the recall task); the layer must not overwrite what it stored.
    pad = model.pad_emb.expand(B, gap, -1) + 0.1 * torch.randn(B, gap, args.dim, generator=g)
    q_keys = torch.gather(keys, 1, order)
    queries = model.key_emb(q_keys)
    x = torch.cat([writes, pad, queries], 1)
    return x, torch.gather(vals, 1, order), W + gap


def evaluate(args, model, g, updates: bool) -> float:
    model.ttt.updates_enabled = updates
    correct = total = 0
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y, q0 = batch(args, model, args.batch, g)
            pred = model(x)[:, q0:].argmax(-1)
            correct += (pred == y).sum().item()
            total += y.numel()
    model.ttt.updates_enabled = True
    return correct / total


def inner_losses(args, model, g) -> list[tuple[float, float]]:
    """Mean inner loss of each write chunk, under the weights before and after that chunk's update."""
    from moshi_ttt.ops.mlp import FastWeights, token_weights, ttt_mlp_piece

    layer = model.ttt
    with torch.no_grad():
        x, _, _ = batch(args, model, args.batch, g)
        xq, xk, xv, lr = layer.projections(model.layer_input(x))
        n = 2 * args.pairs if args.split else args.pairs  # write tokens
        lw, lb = layer.ln_weight.float(), layer.ln_bias.float()
        tau = token_weights(layer.token_offset.float())
        w = FastWeights.expand(layer._init(), x.shape[0])
        out = []
        for s in range(0, n, args.chunk):
            sl = slice(s, min(s + args.chunk, n))
            k, v = xk[:, :, sl], xv[:, :, sl]
            before = _loss(w, k, v, lw, lb)
            _, acc = ttt_mlp_piece(w, None, xq[:, :, sl], k, v, lr[:, :, sl], tau[: k.shape[2]], lw, lb)
            w = w.step(acc, tau[k.shape[2] - 1])
            out.append((before, _loss(w, k, v, lw, lb)))
        return out


def _loss(w, k, v, lw, lb) -> float:
    z = w.mlp(k)
    mu, var = z.mean(-1, keepdim=True), z.var(-1, keepdim=True, unbiased=False)
    pred = (z - mu) / torch.sqrt(var + 1e-6) * lw[:, None] + lb[:, None]
    return (0.5 * ((pred - (v - k)) ** 2).sum(-1)).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--num-keys", type=int, default=32)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--gap", type=int, default=0, help="filler tokens between the writes and the queries")
    p.add_argument("--split", action="store_true", help="key and value in consecutive tokens (see above)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--gate-init", type=float, default=1.0)
    p.add_argument("--no-updates", action="store_true", help="train with the fast weights frozen at W^(0)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = Probe(args)
    model.ttt.updates_enabled = not args.no_updates
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        x, y, q0 = batch(args, model, args.batch, g)
        loss = F.cross_entropy(model(x)[:, q0:].flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss) or not torch.isfinite(gn):
            print(f"step {step}: non-finite loss {loss.item()} / grad norm {gn.item()}")
            raise SystemExit(1)
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.3f} grad {gn.item():.2f}", flush=True)
    eg = torch.Generator().manual_seed(10_000 + args.seed)
    on, off = evaluate(args, model, eg, True), evaluate(args, model, eg, False)
    print(f"query accuracy: updates on {on:.3f}, updates off {off:.3f} (chance {1 / args.num_values:.3f})")
    for i, (b, a) in enumerate(inner_losses(args, model, eg)):
        print(f"write chunk {i}: inner loss before {b:.3f} after {a:.3f}")


if __name__ == "__main__":
    main()
