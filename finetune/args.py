"""The training configuration: one typed schema, defaults in one place, YAML files are instances.

Load with :func:`load_config` (YAML path + dotted overrides). Every section rejects unknown keys
and wrong types with a message naming the key; :meth:`TrainConfig.check` rejects impossible
combinations before any work starts. A key marked ``metadata=FIXED_ON_RESUME`` where it is declared
(here, or in :class:`moshi_ttt.TTTConfig`) may not change when a run resumes
(:func:`check_resume_compatible`); a renamed key (:data:`RENAMED_KEYS`) is still read, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moshi_ttt import TTTConfig

from .data.audio import FRAME_RATE
from .schema import (
    FIXED_ON_RESUME,
    ConfigError,
    apply_overrides,
    fixed_on_resume_keys,
    flatten,
    from_dict,
    get_dotted,
    to_dict,
)

logger = logging.getLogger("finetune")

# Old name -> new name. Old run configs (a checkpoint's config.yaml) and command lines still load.
RENAMED_KEYS = {
    # The optimizer's rate for the TTT parameters; in the paper's code ``ttt_lr`` is the inner rate (eta).
    "optim.ttt_lr": "optim.ttt_params_lr",
}


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

    # The base model: fixed on resume (the trained weights belong to it).
    source: Literal["tiny", "hf", "local"] = field(default="tiny", metadata=FIXED_ON_RESUME)
    hf_repo: str = field(default="kyutai/moshiko-pytorch-bf16", metadata=FIXED_ON_RESUME)
    moshi_weights: str | None = field(default=None, metadata=FIXED_ON_RESUME)
    config_path: str | None = field(default=None, metadata=FIXED_ON_RESUME)
    tiny: dict[str, Any] = field(default_factory=dict, metadata=FIXED_ON_RESUME)
    gradient_checkpointing: bool = False  # memory only: may change on resume
    # Start from a fine-tuned checkpoint in moshi's layout: moshi-finetune's
    # checkpoints/checkpoint_NNNNNN/consolidated/ (its lora.safetensors is merged into the base above;
    # a consolidated.safetensors replaces it, architecture from its config.json) or this project's
    # moshi/ export. TTT layers then take w_down from the fine-tuned linear_out.
    init_from: str | None = field(default=None, metadata=FIXED_ON_RESUME)
    # A moshi_weights file that is not safetensors (moshi's .pt) is read with pickle, which can run code
    # stored in the file: refused unless this is true (only for files you trust).
    allow_pickle: bool = False
    # Attention window (steps) for fine-tuning, replacing the checkpoint's; may change on resume.
    context: int | None = None


@dataclass
class EtaAutoArgs:
    """How ``ttt.eta: auto`` picks eta (:func:`finetune.training.eta_auto.calibrate_eta`).

    The run trains ``steps`` steps at ``start``, then measures every TTT layer's ``ttt/base`` (the
    TTT term over the base term, the telemetry the console prints) on the first ``batches``
    training batches and rescales eta once so that it becomes ``target``: ``ttt/base`` is linear in
    eta, so ``eta = start x target / ttt/base``, per layer with ``per_layer`` (else one eta from the
    layers' mean). The default 10 beat 1.0 (the middle of the band where the recall grid kept
    in-window recall) on far recall in all four cells of the eta grid and lost no near recall on
    average (3 seeds each; docs/long_context_scaling.md, "2. eta chosen by the tool"). The chosen etas
    are logged, saved in the checkpoints (trainer state and TTT file) and reused on resume.
    """

    target: float = 10.0
    steps: int = 50
    start: float | None = None  # eta during the warm-up; null: 0.1 (eta_norm none) or 100 (zsq)
    per_layer: bool = True
    batches: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not (0 < self.target < float("inf")):
            raise ConfigError(
                f"ttt.eta_auto.target: must be a ttt/base level > 0, e.g. 1.0 (got {self.target})"
            )
        if self.steps < 1:
            raise ConfigError(f"ttt.eta_auto.steps: must be >= 1 warm-up steps (got {self.steps})")
        if self.start is not None and not (0 < self.start < float("inf")):
            raise ConfigError(f"ttt.eta_auto.start: must be an eta > 0 or null (got {self.start})")
        if self.batches < 1:
            raise ConfigError(f"ttt.eta_auto.batches: must be >= 1 (got {self.batches})")

    def start_eta(self, eta_norm: str) -> float:
        if self.start is not None:
            return self.start
        return 100.0 if eta_norm == "zsq" else 0.1


@dataclass
class TTTArgs(TTTConfig):
    """The core's :class:`TTTConfig`, plus what training does with the TTT parameters, and
    ``eta: auto`` (:class:`EtaAutoArgs`): eta calibrated at the start of the run."""

    eta: float | Literal["auto"] = 1e-2
    eta_auto: EtaAutoArgs = field(default_factory=EtaAutoArgs)
    enabled: bool = field(default=True, metadata=FIXED_ON_RESUME)
    # The TTT layers' W_gate / W_up do not train. null: true for finetune=ttt_only, false otherwise.
    freeze_slow_weights: bool | None = field(default=None, metadata=FIXED_ON_RESUME)
    # Whether the TTT weights taken from the base checkpoint train (In-Place's w_down, the fast weight's
    # initial state W^(0); moshi_ttt.ParamGroup.pretrained).
    train_w_down: bool = field(default=True, metadata=FIXED_ON_RESUME)

    @property
    def auto(self) -> bool:
        return self.eta == "auto"

    def validate(self) -> None:
        if not self.auto:
            return super().validate()
        if self.eta_layers is not None:
            raise ValueError(
                "TTTConfig.eta_layers: eta: auto computes the per-layer etas; give ttt.eta: auto or "
                "ttt.eta_layers, not both"
            )
        self.eta = self.eta_auto.start_eta(self.eta_norm)  # the rest is checked as for a number
        try:
            super().validate()
        finally:
            self.eta = "auto"

    def to_ttt_config(self) -> TTTConfig:
        """The model's TTT settings; with ``eta: auto``, eta is the warm-up's (``eta_auto.start``)."""
        names = {f.name for f in dataclasses.fields(TTTConfig)}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if self.auto:
            d["eta"] = self.eta_auto.start_eta(self.eta_norm)
        return TTTConfig(**d)


@dataclass
class LoraArgs:
    """moshi's LoRA on every Linear (``lora_B`` zero-initialised, so the start is the base model).
    Every key is fixed on resume: adapter shapes, their scale, the trained parameter set."""

    rank: int = field(default=64, metadata=FIXED_ON_RESUME)
    scaling: float = field(default=2.0, metadata=FIXED_ON_RESUME)
    # Also train the embedding tables in full (moshi-finetune's lora.ft_embed); exports then carry them.
    train_embeddings: bool = field(default=False, metadata=FIXED_ON_RESUME)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1 (got {self.rank})")


@dataclass
class OptimArgs:
    """AdamW; ``schedule: cosine`` is linear warmup then cosine decay to ``min_lr_ratio * lr``,
    ``onecycle`` is moshi-finetune's schedule (torch's ``OneCycleLR``): cosine rise from ``lr / 25``
    to ``lr`` over the first ``pct_start`` of the steps, cosine decay to ``lr / 25 / 1e4``, and Adam's
    beta1 cycled 0.95 -> 0.85 -> 0.95 against it (``betas[0]`` is then unused)."""

    lr: float = 1e-4
    # The optimizer's lr for the TTT parameters (w_down, target path; not the inner rate ttt.eta);
    # null: lr. Was optim.ttt_lr.
    ttt_params_lr: float | None = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_steps: int = 10  # cosine
    min_lr_ratio: float = 0.1  # cosine
    pct_start: float = 0.05  # onecycle
    max_grad_norm: float = 1.0  # global norm over all ranks; <= 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0 or (self.ttt_params_lr is not None and self.ttt_params_lr <= 0):
            raise ConfigError("optim.lr / optim.ttt_params_lr: must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1) (got {self.betas})")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0 (got {self.warmup_steps})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1] (got {self.min_lr_ratio})")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"optim.pct_start: must be in (0, 1) (got {self.pct_start})")

    def group_lr(self, ttt: bool) -> float:
        """The peak lr of an optimizer group of TTT parameters (``ttt``) or of the others."""
        return self.ttt_params_lr if (ttt and self.ttt_params_lr is not None) else self.lr


@dataclass
class SyntheticDataArgs:
    """Generated token sequences with learnable structure (no audio needed)."""

    num_train: int = field(default=256, metadata=FIXED_ON_RESUME)  # the set's size: the data order
    num_eval: int = 32


@dataclass
class RecallDataArgs:
    """The beyond-the-window recall task (``finetune.data.recall``): sequences of ``duration_sec``.

    ``audio``: ``silent`` (a constant code), ``uniform`` (i.i.d. random codes), ``markov`` (every codebook changes every frame) or
    ``bank`` (windows of real Mimi codes read through the manifest pipeline: ``data.train`` /
    ``data.eval`` with their tokenizer, Mimi and cache). ``filler_rate``: fraction of the frames
    between events that hold a random filler word instead of PAD. ``far_pairs``: how many of the
    ``pairs`` are queried beyond the receptive field (null: half, rounded up; ``pairs``: far-only
    data). ``near_max``: the largest near-query distance in steps (null: the attention window less
    5, so near distances scale with the window). ``far_min``: the smallest far distance (null: the
    receptive field + 2, the first distance attention cannot reach; larger values only).
    """

    # Fixed on resume: the training sequences (num_eval only sizes the held-out set).
    num_train: int = field(default=2048, metadata=FIXED_ON_RESUME)
    num_eval: int = 64
    pairs: int = field(default=4, metadata=FIXED_ON_RESUME)
    num_keys: int = field(default=16, metadata=FIXED_ON_RESUME)
    num_values: int = field(default=16, metadata=FIXED_ON_RESUME)
    audio: Literal["silent", "uniform", "markov", "bank"] = field(default="silent", metadata=FIXED_ON_RESUME)
    filler_rate: float = field(default=0.0, metadata=FIXED_ON_RESUME)
    # Where the facts are stated: Moshi's text stream, or the other speaker's audio codebooks (fixed
    # code patterns of pattern_frames frames, or spoken words: word_codes from make_word_codes.py).
    facts: Literal["text", "audio", "speech"] = field(default="text", metadata=FIXED_ON_RESUME)
    pattern_frames: int = field(default=2, metadata=FIXED_ON_RESUME)
    word_codes: str | None = field(default=None, metadata=FIXED_ON_RESUME)
    # Pairs queried beyond the receptive field (the rest within one window); null: half, rounded up;
    # 0: the in-window part alone; pairs: far-only data.
    far_pairs: int | None = field(default=None, metadata=FIXED_ON_RESUME)
    near_max: int | None = field(default=None, metadata=FIXED_ON_RESUME)
    far_min: int | None = field(default=None, metadata=FIXED_ON_RESUME)
    # Facts in audio: Moshi repeats each fact it hears in its text stream (an acknowledgement).
    echo: bool = field(default=False, metadata=FIXED_ON_RESUME)
    # Share of the training items that are windows of the data.train conversations instead.
    conversations: float = field(default=0.0, metadata=FIXED_ON_RESUME)

    def __post_init__(self) -> None:
        if self.far_pairs is not None and not 0 <= self.far_pairs <= self.pairs:
            raise ConfigError(
                f"data.recall.far_pairs: must be in [0, pairs={self.pairs}] or null (got {self.far_pairs})"
            )
        if self.near_max is not None and self.near_max < 3:
            raise ConfigError(f"data.recall.near_max: must be >= 3 steps or null (got {self.near_max})")
        if not 0.0 <= self.filler_rate <= 1.0:
            raise ConfigError(f"data.recall.filler_rate: must be in [0, 1] (got {self.filler_rate})")
        if not 0.0 <= self.conversations < 1.0:
            raise ConfigError(f"data.recall.conversations: must be in [0, 1) (got {self.conversations})")
        if (
            isinstance(self.pattern_frames, bool)
            or not isinstance(self.pattern_frames, int)
            or self.pattern_frames < 1
        ):
            raise ConfigError(
                f"data.recall.pattern_frames: must be an integer >= 1 (got {self.pattern_frames!r})"
            )
        if self.facts == "speech" and not self.word_codes:
            raise ConfigError(
                "data.recall.facts: speech needs data.recall.word_codes (make it with scripts/make_word_codes.py)"
            )

    @property
    def reads_manifests(self) -> bool:
        """Whether the task reads the data.train / data.eval conversations (bank audio or mixed in)."""
        return self.audio == "bank" or self.conversations > 0


@dataclass
class DataArgs:
    """Training data: ``manifest`` (moshi-finetune jsonl of stereo wavs + alignments) or ``synthetic``.

    For manifests, ``tokenizer`` / ``mimi_weights`` default to the checkpoint's own files with
    ``model.source: hf``. ``cache_dir`` holds Mimi codes encoded once (``scripts/encode_codes.py``);
    without it every window is encoded when it is read.

    Fixed on resume: what the training windows are and their order (the saved data position counts
    batches of them). The paths of the tokenizer, Mimi and the cache may change (a run moved to
    another machine), as may the eval set.
    """

    source: Literal["synthetic", "manifest", "recall"] = field(default="synthetic", metadata=FIXED_ON_RESUME)
    train: str | None = field(default=None, metadata=FIXED_ON_RESUME)  # manifest path
    eval: str | None = None  # manifest path; null: no evaluation data
    tokenizer: str | None = None  # sentencepiece model
    mimi_weights: str | None = None  # safetensors
    mimi_config: str | None = None  # JSON, for a non-default Mimi (e.g. the tiny one)
    cache_dir: str | None = None
    duration_sec: float = field(default=8.0, metadata=FIXED_ON_RESUME)  # window length (FRAME_RATE: 12.5 Hz)
    # When a word starts while the previous word's tokens are still being written: drop their rest
    # (moshi-finetune's rule, the grids Kyutai fine-tuned with) or delay the new word until they are
    # written (moshi-finetune's keep_and_shift). See finetune/data/interleave.py.
    text_overlap: Literal["drop", "delay"] = field(default="drop", metadata=FIXED_ON_RESUME)
    # A new random order of the windows every epoch; false: manifest order.
    shuffle: bool = field(default=True, metadata=FIXED_ON_RESUME)
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
        return int(round(self.duration_sec * FRAME_RATE))


@dataclass
class LossArgs:
    """Cross entropy over moshi's ``out.mask`` / ``out.text_mask``, with moshi-finetune's weights."""

    text_weight: float = 1.0
    audio_weight: float = 1.0
    # Multiplier of the semantic (first) codebook's CE: 100 as in moshi-finetune's example config,
    # the setting Kyutai recommends for fine-tuning Moshi (moshi-finetune's code default is 1).
    first_codebook_weight: float = 100.0
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
    """Weights & Biases tracking. No key here: wandb itself reads it from WANDB_API_KEY, else the netrc
    file ($NETRC, else ~/.netrc, where ``wandb login`` writes it)."""

    project: str | None = None  # null: no wandb
    entity: str | None = None
    run_name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = field(default_factory=list)


@dataclass
class DistributedArgs:
    # Used when launched with more than one process. Fixed on resume: FSDP checkpoints hold dcp shards.
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata=FIXED_ON_RESUME)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # A process silent (dead or hung) this long ends the run, naming its rank; collectives wait at most
    # this long plus three heartbeats. Must exceed the longest wait of one rank for another in a healthy
    # run (rank 0 writing a checkpoint). See finetune.training.distributed.PeerWatch.
    timeout_sec: float = 600.0

    def __post_init__(self) -> None:
        if not self.timeout_sec >= 1:
            raise ConfigError(f"distributed.timeout_sec: must be >= 1 second (got {self.timeout_sec})")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir if any; never; or a checkpoint path
    seed: int = field(default=0, metadata=FIXED_ON_RESUME)  # the data order (and a tiny model's init)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on GPU, fp32 on CPU. bf16 on CPU runs CPU autocast (slow; for precision
    # experiments such as bf16 update math on the recall task).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # TF32 for float32 matmuls on GPU: the TTT update math (float32 by design) runs ~1.7x faster on
    # an H100 with 10-bit-mantissa inputs and float32 accumulation (scripts/bench_ttt.py --tf32).
    tf32: bool = False
    finetune: Literal["lora", "full", "ttt_only"] = field(default="lora", metadata=FIXED_ON_RESUME)
    batch_size: int = field(default=1, metadata=FIXED_ON_RESUME)  # per process; the saved data position
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
        r = self.data.recall
        if self.data.source == "recall" and r.reads_manifests and not self.data.train:
            what = (
                "data.recall.audio: bank reads its audio windows"
                if r.audio == "bank"
                else ("data.recall.conversations mixes in conversation windows")
            )
            raise ConfigError(f"{what} from data.train (and data.eval) manifests; set data.train")
        if self.data.source == "manifest" and not self.data.train:
            raise ConfigError(
                "data.train: the path of a .jsonl manifest is required when data.source is manifest"
            )
        if self.model.init_from and self.model.source == "tiny":
            raise ConfigError(
                "model.init_from: set model.source to hf or local, the base model the checkpoint was fine-tuned from"
            )
        if self.model.init_from and not Path(self.model.init_from).expanduser().exists():
            raise ConfigError(f"model.init_from: {self.model.init_from} does not exist")
        if (
            self.model.source == "local"
            and not self.model.init_from
            and not (self.model.config_path and self.model.moshi_weights)
        ):
            raise ConfigError(
                "model.source local needs model.config_path (config.json) and model.moshi_weights"
            )
        if self.model.context is not None and self.model.context < 1:
            raise ConfigError(f"model.context: must be >= 1 steps or null (got {self.model.context})")
        if self.model.tiny and self.model.source != "tiny":
            raise ConfigError(
                "model.tiny: only used with model.source tiny; remove it or set model.source: tiny"
            )
        if self.ttt.enabled and self.ttt.auto and self.ttt.eta_auto.steps >= self.max_steps:
            raise ConfigError(
                f"ttt.eta: auto calibrates after ttt.eta_auto.steps ({self.ttt.eta_auto.steps}) steps, "
                f"but the run has max_steps {self.max_steps}: lower ttt.eta_auto.steps or set ttt.eta"
            )
        if self.model.source == "tiny" and self.ttt.enabled:
            from moshi_ttt.tiny import tiny_lm_kwargs

            try:
                self.ttt.resolve_layers(tiny_lm_kwargs(**self.model.tiny)["num_layers"])
            except ValueError as e:
                raise ConfigError(f"ttt: {e}") from e
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
    from .compat.convert import refuse_moshi_finetune_keys

    data = upgrade_renamed_keys(data, str(path) if path is not None else "the config")
    if overrides:
        overrides = upgrade_renamed_keys(overrides, "the command line", nested=False)
    refuse_moshi_finetune_keys(data, overrides, path, TrainConfig)
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


def upgrade_renamed_keys(data: dict[str, Any], where: str, nested: bool = True) -> dict[str, Any]:
    """``data`` (a nested config dict, or dotted overrides with ``nested=False``) with every old key
    of :data:`RENAMED_KEYS` under its new name, and a warning naming it."""
    flat = flatten(data) if nested else dict(data)
    old = [k for k in RENAMED_KEYS if k in flat]
    if not old:
        return data
    for key in old:
        new = RENAMED_KEYS[key]
        if new in flat:
            raise ConfigError(f"{where}: {key} is the old name of {new}; give only {new}")
        logger.warning("%s: %s is now called %s (read as such)", where, key, new)
        flat[new] = flat.pop(key)
    return apply_overrides({}, flat) if nested else flat


def saved_config_with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the keys added to the schema since it was written, at their defaults (so a
    new key does not read as a changed setting), and renamed keys under their new names."""
    saved = upgrade_renamed_keys(saved, "the checkpoint's config.yaml")
    try:
        return to_dict(from_dict(TrainConfig, saved))
    except ConfigError:  # a key since removed: compare as saved
        return saved


def check_resume_compatible(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int
) -> None:
    """Refuse to resume a checkpoint trained with ``saved`` under ``current`` if a key marked
    ``fixed_on_resume`` (or the number of processes) differs; warn about any other difference."""
    saved = saved_config_with_defaults(saved)
    fixed = fixed_on_resume_keys(TrainConfig)
    bad = [k for k in fixed if get_dotted(saved, k) != get_dotted(current, k)]
    if get_dotted(saved, "ttt.enabled") is False and get_dotted(current, "ttt.enabled") is False:
        bad = [k for k in bad if not k.startswith("ttt.")]  # no TTT layer: its settings shape nothing
    if saved_world != world:
        bad.append(f"world size ({saved_world} -> {world} processes)")
    if bad:
        raise ConfigError(
            f"cannot resume: the checkpoint was trained with different {', '.join(bad)}; these change shapes, "
            "the trained parameters or the training data. Use the original settings, or start a new run_dir"
        )
    fs, fc = flatten(saved), flatten(current)
    changed = sorted(k for k in set(fs) | set(fc) if fs.get(k) != fc.get(k) and k not in ("resume",))
    if changed:
        logger.warning(
            "resuming with changed settings: %s",
            ", ".join(f"{k}: {fs.get(k)!r} -> {fc.get(k)!r}" for k in changed),
        )
