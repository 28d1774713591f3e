"""Configuration of In-Place TTT layers.

`TTTConfig` holds everything that changes what a TTT model computes. It is stored beside a
checkpoint (in the TTT safetensors file's metadata), never inside Moshi's own ``config.json``:
moshi passes every key of that file to ``LMModel`` and an unknown key is a ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .ops.inplace import PRECISIONS as UPDATE_PRECISIONS

TARGET_SOURCES = ("text_emb", "input_emb", "user_audio_emb", "hidden")
FAST_FORMS = ("auto", "dual", "scan")
ETA_NORMS = ("none", "zsq")
WRITE_GATE_INPUTS = ("source", "key")
# Field metadata of the settings the TTT parameters depend on (which exist, their shapes, what they
# read): a checkpoint is tied to them (finetune's resume check refuses a change).
_FIXED = {"fixed_on_resume": True}


@dataclass
class TTTConfig:
    """Settings of the In-Place TTT layers of a Moshi model.

    Attributes:
        chunk_size: tokens (12.5 Hz frames for Moshi) per fast-weight update. Chunk ``i`` is computed
            with ``W^(i-1)``; its update only helps later chunks. 512 follows the paper's ablation.
        eta: the TTT learning rate in ``W^(i) = W^(i-1) + eta * V[i]^T Z[i]``. Its useful range
            depends on the scale of ``Z`` and ``V``; sweep it on a log scale. For ``variant: mlp`` it
            is the base inner learning rate: token ``t``'s rate is ``eta * sigmoid(x_t w + b) / head_dim``
            (ttt-lm-pytorch's ``ttt_base_lr``, 1.0 there).
        eta_norm: ``none`` (raw ``eta``, what the paper's ``eta = 3`` means) or ``zsq``: each chunk's
            update is divided by the chunk's mean ``||z_t||^2`` (computed in the forward pass), so
            ``W^(i) = W^(i-1) + eta * V[i]^T Z[i] / mean_t ||z_t||^2``. Then what an update adds to a
            later output, ``eta * sum_t (z_s . z_t) v_t / mean ||z||^2``, no longer grows with the
            MLP width or the checkpoint's activation scale. A raw ``eta`` corresponds to
            ``eta * mean ||z||^2`` in ``zsq`` (the training telemetry logs ``z_sq_mean`` per layer).
            In-Place TTT only.
        eta_layers: per-layer eta, ``{main-transformer layer index: eta}``, used instead of ``eta``
            for the layers it lists (the same units: raw or ``zsq`` per ``eta_norm``). A training
            run's ``ttt.eta: auto`` calibration writes it (``finetune``); every TTT layer's own
            ``config`` holds its resolved ``eta`` (:meth:`layer_config`).
        conv_kernel_size: taps ``K`` of the target convolution; position ``t`` sees ``t .. t+K-1``
            inside its own chunk (zero padding at the chunk's right edge).
        conv_depthwise: one filter per channel (``d*K`` weights) instead of a full ``d x d x K`` conv.
        target_source: what the target convolution reads: ``text_emb`` (the text-token embedding:
            Moshi's own inner monologue), ``input_emb`` (the summed text + audio embedding entering
            the transformer), ``user_audio_emb`` (the summed embeddings of the other speaker's audio
            codebooks, ``dep_q .. n_q - 1``: what the user says, which never reaches Moshi as text)
            or ``hidden`` (the MLP's own input, the official continual-training choice).
        layers: explicit main-transformer layer indices; overrides ``start_layer``/``layer_frequency``.
        start_layer, layer_frequency: select layers ``start_layer, start_layer + layer_frequency, ...``.
        fast_form: ``auto`` picks the quadratic dual form for short sequences and the linear
            chunk scan for long ones (see :func:`moshi_ttt.ops.ttt_chunked`).
        write_gate: In-Place TTT: a learned per-token write strength ``g_t = 2 sigmoid(x_t . w + b)``
            of the target source ``x_t`` multiplies the target, so a chunk's update is
            ``eta * sum_t g_t v_t z_t^T`` (a per-token learning rate, as LaCT and TTT-MLP have); 1 at
            init (``w = b = 0``). With live audio it lets the layer write only where the text carries
            something (see the README's long-context section).
        write_gate_input: what the write gate reads: ``source`` (the target source ``x_t``, as above)
            or ``key`` (the layer's own activations ``z_t``, the fast weight's key: they depend on
            the context, so the gate can open where the hidden state says a fact is being stated,
            e.g. on the other speaker's audio, where the source alone cannot tell a fact from speech).
        update_precision: In-Place TTT's update math under bf16 autocast or in a bf16 model: ``bf16``
            multiplies bf16 operands into float32 sums (tensor-core speed; the scores ``Z Z^T`` and
            their gradients are rounded to bf16 where they enter a product), ``fp32`` keeps every
            operand float32 (TF32 with the training config's ``tf32``). Whatever accumulates across
            chunks (streaming ``delta``, ``w_final``, the scan state) is float32 either way, and a
            float32 model computes the same in both. Errors against a float64 reference:
            ``scripts/check_precision.py``. TTT-MLP ignores it (its fast-weight math is float32).
        variant: a name in :data:`moshi_ttt.variants.VARIANTS`: ``inplace`` (In-Place TTT: the MLP's
            ``w_down`` is the fast weight, :mod:`moshi_ttt.gating`) or ``mlp`` (a TTT-MLP residual
            branch beside the MLP, :mod:`moshi_ttt.ttt_mlp`; ``chunk_size`` is its mini-batch,
            ``eta`` its base inner learning rate; the conv/target settings do not apply).
        mlp_heads, mlp_expansion: heads of the TTT-MLP branch and the hidden size of each head's
            fast MLP as a multiple of the head dimension.
        mlp_qk_norm: TTT-MLP: L2-normalise each head's queries and keys (ttt-video-dit does,
            ttt-lm-pytorch does not).

    Fields marked ``fixed_on_resume`` in their metadata decide the TTT parameters; the others (chunk
    size, eta, fast form, qk norm) only how they are used, with one exception: TTT-MLP's learned
    per-position rate offsets have one entry per chunk position, so its ``chunk_size`` shapes a
    parameter (a resume that changes it is refused when the weights are loaded).
    """

    chunk_size: int = 512
    eta: float = 1e-2
    eta_norm: str = "none"
    eta_layers: dict[int, float] | None = None
    conv_kernel_size: int = field(default=2, metadata=_FIXED)
    conv_depthwise: bool = field(default=True, metadata=_FIXED)
    target_source: str = field(default="text_emb", metadata=_FIXED)
    layers: list[int] | None = field(default=None, metadata=_FIXED)
    start_layer: int = field(default=0, metadata=_FIXED)
    layer_frequency: int = field(default=6, metadata=_FIXED)
    fast_form: str = "auto"
    update_precision: str = "bf16"
    write_gate: bool = field(default=False, metadata=_FIXED)
    write_gate_input: str = field(default="source", metadata=_FIXED)
    variant: str = field(default="inplace", metadata=_FIXED)
    mlp_heads: int = field(default=4, metadata=_FIXED)
    mlp_expansion: int = field(default=4, metadata=_FIXED)
    mlp_qk_norm: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"TTTConfig.{name}: {why} (got {getattr(self, name)!r})")

        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            raise bad("chunk_size", "must be an integer >= 1")
        if (
            isinstance(self.eta, bool)
            or not isinstance(self.eta, (int, float))
            or not math.isfinite(self.eta)
        ):
            raise bad("eta", "must be a finite number")
        if self.eta < 0:
            raise bad("eta", "must be >= 0 (0 turns the fast-weight updates off)")
        if self.eta_layers is not None:
            if not isinstance(self.eta_layers, dict):
                raise bad("eta_layers", "must map layer indices to etas, or be null")
            out = {}
            for k, v in self.eta_layers.items():
                if isinstance(k, str) and k.lstrip("-").isdigit():
                    k = int(k)  # JSON (the TTT file's metadata) writes keys as strings
                if not _is_int(k):
                    raise bad("eta_layers", f"key {k!r} is not a layer index")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise bad("eta_layers", f"layer {k}: eta must be a finite number >= 0")
                out[k] = float(v)
            self.eta_layers = out
        if self.eta_norm not in ETA_NORMS:
            raise bad("eta_norm", f"must be one of {', '.join(ETA_NORMS)}")
        if not _is_int(self.conv_kernel_size) or self.conv_kernel_size < 1:
            raise bad("conv_kernel_size", "must be an integer >= 1")
        if not isinstance(self.conv_depthwise, bool):
            raise bad("conv_depthwise", "must be true or false")
        if self.target_source not in TARGET_SOURCES:
            raise bad("target_source", f"must be one of {', '.join(TARGET_SOURCES)}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(_is_int(i) for i in self.layers):
                raise bad("layers", "must be a list of integer layer indices, or null")
            if len(self.layers) == 0:
                raise bad("layers", "must not be empty (disable TTT instead of selecting no layer)")
            if len(set(self.layers)) != len(self.layers):
                raise bad("layers", "contains duplicate indices")
            self.layers = sorted(int(i) for i in self.layers)
        if not _is_int(self.start_layer) or self.start_layer < 0:
            raise bad("start_layer", "must be an integer >= 0")
        if not _is_int(self.layer_frequency) or self.layer_frequency < 1:
            raise bad("layer_frequency", "must be an integer >= 1")
        if self.fast_form not in FAST_FORMS:
            raise bad("fast_form", f"must be one of {', '.join(FAST_FORMS)}")
        if not isinstance(self.write_gate, bool):
            raise bad("write_gate", "must be true or false")
        if self.write_gate and self.variant != "inplace":
            raise bad(
                "write_gate",
                "is an In-Place TTT option (variant: inplace); TTT-MLP has its own per-token rate",
            )
        if self.write_gate_input not in WRITE_GATE_INPUTS:
            raise bad("write_gate_input", f"must be one of {', '.join(WRITE_GATE_INPUTS)}")
        if self.update_precision not in UPDATE_PRECISIONS:
            raise bad("update_precision", f"must be one of {', '.join(UPDATE_PRECISIONS)}")
        from .variants import VARIANTS  # here, not at the top: the variant modules import this one

        if self.variant not in VARIANTS:
            raise bad("variant", f"must be one of {', '.join(VARIANTS)}")
        if self.eta_norm != "none" and self.variant != "inplace":
            raise bad("eta_norm", f"applies to variant inplace only (variant is {self.variant!r}); use none")
        for name in ("mlp_heads", "mlp_expansion"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        if not isinstance(self.mlp_qk_norm, bool):
            raise bad("mlp_qk_norm", "must be true or false")

    def layer_config(self, layer: int) -> TTTConfig:
        """The config TTT layer ``layer`` runs with: this one, with ``eta`` from ``eta_layers`` when
        it lists the layer."""
        if not self.eta_layers or layer not in self.eta_layers:
            return self
        return dataclasses.replace(self, eta=self.eta_layers[layer], eta_layers=None)

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The main-transformer layer indices that become TTT layers in a model of ``num_layers``."""
        if self.layers is not None:
            out_of_range = [i for i in self.layers if not -num_layers <= i < num_layers]
            if out_of_range:
                raise ValueError(
                    f"TTTConfig.layers: indices {out_of_range} are out of range for a transformer with "
                    f"{num_layers} layers (valid: 0..{num_layers - 1}, or negative from the end)"
                )
            return sorted({i % num_layers for i in self.layers})
        if self.start_layer >= num_layers:
            raise ValueError(
                f"TTTConfig.start_layer: {self.start_layer} is out of range for a transformer with "
                f"{num_layers} layers (valid: 0..{num_layers - 1})"
            )
        return list(range(self.start_layer, num_layers, self.layer_frequency))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TTTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TTTConfig: unknown keys {unknown}; allowed keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> TTTConfig:
        return cls.from_dict(json.loads(s))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
