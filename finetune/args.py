"""The training configuration: one typed schema, defaults in one place, YAML files are instances.

Load with :func:`load_config` (YAML path + dotted overrides). Every section rejects unknown keys
and wrong types with a message naming the key; :meth:`TrainConfig.check` rejects impossible
combinations before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moshi_ttt import TTTConfig

from .schema import ConfigError, apply_overrides, from_dict, to_dict


@dataclass
class ModelArgs:
    """Where the base Moshi comes from.

    ``source: tiny`` builds a random-weight tiny Moshi (``tiny`` overrides its ``LMModel`` kwargs, see
    :func:`moshi_ttt.tiny.tiny_lm_kwargs`); ``hf`` loads ``hf_repo`` through moshi's ``CheckpointInfo``
    (``moshi_weights`` / ``config_path`` may point at local files or ``hf://`` paths); ``local`` needs
    ``config_path`` (moshi's config.json) and ``moshi_weights`` (safetensors). ``context`` replaces
    the main transformer's attention window (steps; Moshi-7B's is 3000) for fine-tuning, so that TTT
    must carry what attention no longer sees; the moshi export's config.json keeps it.
    """

    source: Literal["tiny", "hf", "local"] = "tiny"
    hf_repo: str = "kyutai/moshiko-pytorch-bf16"
    moshi_weights: str | None = None
    config_path: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    context: int | None = None


@dataclass
class TTTArgs(TTTConfig):
    """The core's :class:`TTTConfig`, plus what training does with the TTT parameters."""

    enabled: bool = True
    # The TTT layers' W_gate / W_up do not train. null: true for finetune=ttt_only, false otherwise.
    freeze_slow_weights: bool | None = None
    # Whether the TTT weights taken from the base checkpoint train (In-Place's w_down, the fast weight's
    # initial state W^(0); moshi_ttt.ParamGroup.pretrained).
    train_w_down: bool = True

    def to_ttt_config(self) -> TTTConfig:
        names = {f.name for f in dataclasses.fields(TTTConfig)}
        return TTTConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class LoraArgs:
    """moshi's LoRA on every Linear (``lora_B`` zero-initialised, so the start is the base model)."""

    rank: int = 64
    scaling: float = 2.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1 (got {self.rank})")


@dataclass
class OptimArgs:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    ttt_lr: float | None = None  # lr of the TTT parameters (w_down, target path); null: lr
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # global norm over all ranks; <= 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0 or (self.ttt_lr is not None and self.ttt_lr <= 0):
            raise ConfigError("optim.lr / optim.ttt_lr: must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1) (got {self.betas})")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0 (got {self.warmup_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1] (got {self.min_lr_ratio})")


@dataclass
class SyntheticDataArgs:
    """Generated token sequences with learnable structure (no audio needed)."""

    num_train: int = 256
    num_eval: int = 32


@dataclass
class RecallDataArgs:
    """The beyond-the-window recall task (``finetune.data.recall``): sequences of ``duration_sec``."""

    num_train: int = 2048
    num_eval: int = 64
    pairs: int = 4
    num_keys: int = 16
    num_values: int = 16


@dataclass
class DataArgs:
    """Training data: ``manifest`` (moshi-finetune jsonl of stereo wavs + alignments) or ``synthetic``.

    For manifests, ``tokenizer`` / ``mimi_weights`` default to the checkpoint's own files with
    ``model.source: hf``. ``cache_dir`` holds Mimi codes encoded once (``scripts/encode_codes.py``);
    without it every window is encoded when it is read.
    """

    source: Literal["synthetic", "manifest", "recall"] = "synthetic"
    train: str | None = None  # manifest path
    eval: str | None = None  # manifest path; null: no evaluation data
    tokenizer: str | None = None  # sentencepiece model
    mimi_weights: str | None = None  # safetensors
    mimi_config: str | None = None  # JSON, for a non-default Mimi (e.g. the tiny one)
    cache_dir: str | None = None
    duration_sec: float = 8.0  # window length; 12.5 frames per second
    num_workers: int = 0
    synthetic: SyntheticDataArgs = field(default_factory=SyntheticDataArgs)
    recall: RecallDataArgs = field(default_factory=RecallDataArgs)

    def __post_init__(self) -> None:
        if self.duration_sec <= 0:
            raise ConfigError(f"data.duration_sec: must be > 0 (got {self.duration_sec})")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0 (got {self.num_workers})")

    @property
    def num_frames(self) -> int:
        return int(round(self.duration_sec * 12.5))


@dataclass
class LossArgs:
    """Cross entropy over moshi's ``out.mask`` / ``out.text_mask``, with moshi-finetune's weights."""

    text_weight: float = 1.0
    audio_weight: float = 1.0
    first_codebook_weight: float = 1.0  # multiplier of the semantic codebook's CE (moshi-finetune: 100)
    text_padding_weight: float = 0.5  # weight of PAD / end-of-padding text targets


@dataclass
class EvalArgs:
    interval: int = 0  # steps between evaluations; 0: only at the end
    num_batches: int = 8


@dataclass
class CheckpointArgs:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    export_moshi: bool = True  # also write moshi-loadable weights (config.json + model / lora file)


@dataclass
class WandbArgs:
    """Weights & Biases tracking; the API key comes only from the environment (WANDB_API_KEY)."""

    project: str | None = None  # null: no wandb
    entity: str | None = None
    run_name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = field(default_factory=list)


@dataclass
class DistributedArgs:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when launched with more than one process
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any; never; or a checkpoint path
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # TF32 for float32 matmuls on GPU: the TTT update math (float32 by design) runs ~1.7x faster on
    # an H100 with 10-bit-mantissa inputs and float32 accumulation (scripts/bench_ttt.py --tf32).
    tf32: bool = False
    finetune: Literal["lora", "full", "ttt_only"] = "lora"
    batch_size: int = 1  # per process
    grad_accum: int = 1
    max_steps: int = 100
    log_interval: int = 10
    max_nonfinite_steps: int = 10  # stop after this many consecutive skipped (non-finite) steps
    model: ModelArgs = field(default_factory=ModelArgs)
    ttt: TTTArgs = field(default_factory=TTTArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    data: DataArgs = field(default_factory=DataArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    wandb: WandbArgs = field(default_factory=WandbArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        for name in ("eval.interval", "checkpoint.interval", "checkpoint.keep_last", "eval.num_batches"):
            section, key = name.split(".")
            if getattr(getattr(self, section), key) < 0:
                raise ConfigError(f"{name}: must be >= 0")

    @property
    def freeze_slow_weights(self) -> bool:
        f = self.ttt.freeze_slow_weights
        return self.finetune == "ttt_only" if f is None else f

    def check(self) -> None:
        """Combinations that cannot work, caught before any model is built."""
        if self.finetune == "ttt_only" and not self.ttt.enabled:
            raise ConfigError("finetune: ttt_only trains only TTT parameters, but ttt.enabled is false")
        if self.data.source == "manifest" and not self.data.train:
            raise ConfigError(
                "data.train: the path of a .jsonl manifest is required when data.source is manifest"
            )
        if self.model.source == "local" and not (self.model.config_path and self.model.moshi_weights):
            raise ConfigError(
                "model.source local needs model.config_path (config.json) and model.moshi_weights"
            )
        if self.model.context is not None and self.model.context < 1:
            raise ConfigError(f"model.context: must be >= 1 steps or null (got {self.model.context})")
        if self.model.tiny and self.model.source != "tiny":
            raise ConfigError(
                "model.tiny: only used with model.source tiny; remove it or set model.source: tiny"
            )
        if self.model.source == "tiny" and self.ttt.enabled:
            from moshi_ttt.tiny import tiny_lm_kwargs

            try:
                self.ttt.resolve_layers(tiny_lm_kwargs(**self.model.tiny)["num_layers"])
            except ValueError as e:
                raise ConfigError(f"ttt: {e}") from e
        if self.precision == "bf16" and self.device == "cpu":
            raise ConfigError("precision: bf16 runs on GPU; on CPU use fp32 (or auto)")
        if self.resume not in ("auto", "never") and not Path(self.resume).exists():
            raise ConfigError(
                f"resume: {self.resume!r} is neither auto, never, nor an existing checkpoint directory"
            )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file (or defaults) plus dotted-key overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        cfg = from_dict(TrainConfig, data)
    except ConfigError:
        raise
    except ValueError as e:  # TTTConfig validation names its field
        raise ConfigError(str(e)) from e
    cfg.check()
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
