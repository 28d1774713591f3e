"""Coming from kyutai-labs/moshi-finetune: its config keys and its YAML files.

- :data:`KEYS` maps each moshi-finetune config key to this project's key and says what differs;
  :func:`refuse_moshi_finetune_keys` turns one used here by mistake into an error naming ours, and a
  whole moshi-finetune YAML given to ``train.py`` into an error naming the converter.
- :func:`convert` turns a moshi-finetune YAML (as a dict) into this project's config, with a report
  of what was mapped, what was not and why, and what behaves differently
  (``scripts/from_moshi_finetune.py`` is its command line).

Starting a run from a moshi-finetune checkpoint is :mod:`finetune.compat.init_from`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.audio import FRAME_RATE
from ..schema import ConfigError, flatten

CONVERTER = "python scripts/from_moshi_finetune.py"

# moshi-finetune's code defaults (finetune/args.py), which apply to keys its YAML leaves out.
MF_DEFAULTS: dict[str, Any] = {
    "data.train_data": "",
    "data.eval_data": "",
    "data.shuffle": False,
    "moshi_paths.hf_repo_id": "kyutai/moshiko-pytorch-bf16",
    "moshi_paths.mimi_path": None,
    "moshi_paths.moshi_path": None,
    "moshi_paths.tokenizer_path": None,
    "moshi_paths.config_path": None,
    "first_codebook_weight_multiplier": 1.0,
    "text_padding_weight": 0.5,
    "optim.lr": 1e-4,
    "optim.weight_decay": 0.1,
    "optim.pct_start": 0.05,
    "seed": 0,
    "num_microbatches": 1,
    "duration_sec": 10.0,
    "batch_size": 1,
    "max_norm": 1.0,
    "max_steps": 100,
    "log_freq": 1,
    "ckpt_freq": 0,
    "save_adapters": True,
    "do_ckpt": True,
    "num_ckpt_keep": 3,
    "eval_freq": 0,
    "do_eval": False,
    "gradient_checkpointing": True,
    "wandb.project": None,
    "wandb.offline": False,
    "wandb.key": None,
    "wandb.run_name": None,
    "lora.enable": False,
    "lora.rank": 64,
    "lora.scaling": 2.0,
    "lora.ft_embed": False,
    "full_finetuning": False,
    "param_dtype": "bfloat16",
    "overwrite_run_dir": False,
    "run_dir": None,
}

# moshi-finetune key -> (this project's key, or None; what to know). docs/moshi_finetune.md, "Key mapping", lists these.
KEYS: dict[str, tuple[str | None, str]] = {
    "data.train_data": ("data.train", "one .jsonl manifest (no 'a.jsonl:0.7,b:0.3' mixes)"),
    "data.eval_data": ("data.eval", "evaluation runs when it is set"),
    "data.shuffle": ("data.shuffle", "true reshuffles every epoch, with another shuffler than sphn's"),
    "moshi_paths.hf_repo_id": ("model.hf_repo", "with model.source: hf"),
    "moshi_paths.moshi_path": ("model.moshi_weights", ""),
    "moshi_paths.config_path": ("model.config_path", ""),
    "moshi_paths.mimi_path": ("data.mimi_weights", ""),
    "moshi_paths.tokenizer_path": ("data.tokenizer", ""),
    "full_finetuning": ("finetune", "finetune: full"),
    "lora.enable": ("finetune", "finetune: lora"),
    "lora.rank": ("lora.rank", ""),
    "lora.scaling": ("lora.scaling", ""),
    "lora.ft_embed": ("lora.train_embeddings", "embedding tables get no weight decay here"),
    "first_codebook_weight_multiplier": ("loss.first_codebook_weight", ""),
    "text_padding_weight": ("loss.text_padding_weight", ""),
    "optim.lr": ("optim.lr", ""),
    "optim.weight_decay": ("optim.weight_decay", "not applied to norms, biases and embeddings here"),
    "optim.pct_start": ("optim.pct_start", "with optim.schedule: onecycle, the same lr and beta1 curve"),
    "seed": ("seed", ""),
    "num_microbatches": ("grad_accum", ""),
    "duration_sec": (
        "data.duration_sec",
        "rounded up to whole 80 ms frames, as moshi-finetune sizes windows",
    ),
    "batch_size": ("batch_size", "per process, as there"),
    "max_norm": ("optim.max_grad_norm", "the global norm over all processes"),
    "max_steps": ("max_steps", ""),
    "log_freq": ("log_interval", ""),
    "ckpt_freq": ("checkpoint.interval", "0: only at the end, as there"),
    "num_ckpt_keep": ("checkpoint.keep_last", "null (keep all) is 0 here"),
    "eval_freq": ("eval.interval", ""),
    "do_eval": ("data.eval", "evaluation runs when data.eval is set; false: data.eval: null"),
    "gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "run_dir": ("run_dir", "an existing run_dir is resumed, never deleted"),
    "wandb.project": ("wandb.project", ""),
    "wandb.run_name": ("wandb.run_name", ""),
    "wandb.offline": ("wandb.mode", "wandb.mode: offline"),
    "wandb.key": (None, "the API key is read only from the WANDB_API_KEY environment variable"),
    "save_adapters": (
        "checkpoint.export_moshi",
        "checkpoints always carry moshi-loadable weights: lora.safetensors for LoRA runs, the whole "
        "model otherwise; merged LoRA weights are not written",
    ),
    "do_ckpt": (
        None,
        "checkpoints are always written (resume needs them); checkpoint.interval: 0 writes the last only",
    ),
    "overwrite_run_dir": (
        None,
        "a run directory is never deleted: an existing one is resumed (resume: auto)",
    ),
    "param_dtype": ("precision", "auto: bf16 autocast on GPU with float32 trainable weights; float32: fp32"),
}

# Sections read as one key when a YAML file is flattened (free-form mappings; an empty section too).
FREE_FORM = ("model.tiny",)

# Keys only a moshi-finetune config has at its top level: a file with any of them is one.
_STRUCTURAL = {"moshi_paths", "full_finetuning", "first_codebook_weight_multiplier", "do_eval", "do_ckpt"}


def _hint(key: str) -> str:
    ours, note = KEYS[key]
    if ours is None:
        return f"{key} is moshi-finetune's key and has no equivalent here: {note}"
    return f"{key} is moshi-finetune's key; here it is {ours}" + (f" ({note})" if note else "")


def schema_has(cls: type, dotted: str) -> bool:
    """Whether ``dotted`` names a field of dataclass config ``cls`` (sections followed)."""
    import dataclasses
    from typing import get_type_hints

    node: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node):
            return True  # inside a free-form mapping (model.tiny)
        hints = get_type_hints(node)
        if part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = hints[part]
    return True


def refuse_moshi_finetune_keys(
    file_data: dict[str, Any], overrides: dict[str, Any] | None, source: str | Path | None, schema: type
) -> None:
    """ConfigError if ``file_data`` (a YAML file) or ``overrides`` use moshi-finetune keys that config
    class ``schema`` does not have: a whole moshi-finetune file gets the converter's command, single
    keys get this project's name for them."""
    in_file = [k for k in flatten(file_data, whole=FREE_FORM) if k in KEYS and not schema_has(schema, k)]
    in_overrides = [k for k in (overrides or {}) if k in KEYS and not schema_has(schema, k)]
    if in_file and source is not None:
        top = {k.split(".")[0] for k in in_file}
        if top & _STRUCTURAL or len(in_file) >= 3 or "data.train_data" in in_file:
            stem = Path(source).stem
            raise ConfigError(
                f"{source} is a moshi-finetune config (keys {', '.join(sorted(in_file)[:6])}, ...); convert it "
                f"first: {CONVERTER} {source} -o configs/{stem}_ttt.yaml (it maps every key and reports "
                "what differs)"
            )
    bad = in_file + in_overrides
    if bad:
        raise ConfigError("; ".join(_hint(k) for k in bad))


# ---------------------------------------------------------------- conversion


@dataclass
class Conversion:
    config: dict[str, Any] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)  # "mf.key -> our.key = value"
    unmapped: list[str] = field(default_factory=list)  # "mf.key: why"
    differs: list[str] = field(default_factory=list)  # behaviour that is not the same
    added: list[str] = field(default_factory=list)  # settings moshi-finetune has no key for
    warnings: list[str] = field(default_factory=list)  # to check in the output (paths not found)
    given: dict[str, Any] = field(default_factory=dict, repr=False)  # the moshi-finetune keys, flattened
    values: dict[str, Any] = field(default_factory=dict, repr=False)  # every key, defaults filled in

    def set(self, key: str, value: Any) -> None:
        node = self.config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def map(self, mf_key: str, our_key: str, value: Any, note: str = "") -> None:
        """Set ``our_key`` and report it as mapped from ``mf_key`` (or from its default)."""
        self.set(our_key, value)
        given = "" if mf_key in self.given else " (moshi-finetune's default)"
        self.mapped.append(f"{mf_key} -> {our_key}: {value!r}{given}" + (f"  [{note}]" if note else ""))

    def report(self) -> str:
        parts = []
        for title, lines in (
            ("CHECK", self.warnings),
            ("mapped", self.mapped),
            ("not mapped", self.unmapped),
            ("behaves differently here", self.differs),
            ("added (no moshi-finetune key)", self.added),
        ):
            if lines:
                parts.append(f"{title}:\n" + "\n".join(f"  {x}" for x in lines))
        return "\n".join(parts)


def _resolve_path(value: str | None, root: Path) -> tuple[str | None, bool]:
    """(path as written into our config, exists?): relative paths are moshi-finetune's, resolved from
    ``root`` (where its torchrun ran); found ones become absolute. hf:// paths pass through."""
    if not value:
        return None, True
    if value.startswith("hf://"):
        return value, True
    p = Path(value).expanduser()
    p = p if p.is_absolute() else root / p
    return (str(p.resolve()), True) if p.exists() else (value, False)


def _manifest(value: str, key: str, root: Path, conv: Conversion) -> str | None:
    """moshi-finetune's data source string -> one manifest path, or None (reported)."""
    sources = [s.strip() for s in value.split(",") if s.strip()]
    if len(sources) != 1:
        conv.unmapped.append(
            f"{key}: {value!r} mixes {len(sources)} sources; this project reads one manifest: concatenate "
            "them into one .jsonl (repeat lines to weight a source) and set data.train"
        )
        return None
    path = sources[0].split(":")[0]  # "path[:weight]"; one source's weight changes nothing
    resolved, found = _resolve_path(path, root)
    if found and resolved and Path(resolved).is_dir():
        files = sorted(Path(resolved).rglob("*jsonl"))
        if len(files) != 1:
            conv.unmapped.append(
                f"{key}: {value!r} is a directory with {len(files)} .jsonl files; this project reads one "
                "manifest: concatenate them and point data.train / data.eval at the result"
            )
            return None
        resolved = str(files[0])
    if not found:
        conv.warnings.append(
            f"{key}: {path} does not exist from {root} (relative paths are resolved from --mf-root, "
            "where moshi-finetune ran); fix the path in the output"
        )
    return resolved


def convert(mf: dict[str, Any], *, mf_root: str | Path = ".", cache_dir: str | None = None) -> Conversion:
    """This project's config (a nested dict) for moshi-finetune config ``mf``, with a report.

    Keys ``mf`` leaves out take moshi-finetune's code defaults (not ours), so the converted run
    trains like the moshi-finetune run would have: for example an absent
    ``first_codebook_weight_multiplier`` is 1.0 there and is written as 1.0 here.
    """
    root = Path(mf_root).expanduser().resolve()
    flat = flatten(mf, whole=FREE_FORM)
    conv = Conversion()
    unknown = sorted(k for k in flat if k not in MF_DEFAULTS and k != "world_size")
    for k in unknown:
        conv.unmapped.append(f"{k}: not a moshi-finetune key (finetune/args.py); ignored")
    if flat.get("wandb.key"):
        raise ConfigError(
            "wandb.key: the file holds a Weights & Biases API key; this project never reads keys from "
            "config files. Remove it from the file and export WANDB_API_KEY in the environment instead"
        )
    conv.given, conv.values = flat, {k: flat.get(k, d) for k, d in MF_DEFAULTS.items()}
    _run(conv)
    lora_on = _mode(conv)
    _model(conv, root)
    _data(conv, root, cache_dir)
    _optim(conv)
    _checkpoints(conv, lora_on)
    _wandb(conv)
    return conv


def _run(conv: Conversion) -> None:
    """The run keys."""
    v, flat, mapped = conv.values, conv.given, conv.map
    if not v["run_dir"]:
        raise ConfigError("run_dir: the moshi-finetune config has none (it is required there too)")
    mapped("run_dir", "run_dir", v["run_dir"])
    if flat.get("overwrite_run_dir"):
        conv.unmapped.append(f"overwrite_run_dir: {KEYS['overwrite_run_dir'][1]}")
    for mf_key, ours in (("seed", "seed"), ("batch_size", "batch_size"), ("max_steps", "max_steps")):
        mapped(mf_key, ours, v[mf_key])
    mapped("num_microbatches", "grad_accum", v["num_microbatches"])
    mapped("log_freq", "log_interval", v["log_freq"])


def _mode(conv: Conversion) -> bool:
    """The fine-tuning mode keys."""
    v, flat, mapped = conv.values, conv.given, conv.map
    lora_on, full = bool(v["lora.enable"]), bool(v["full_finetuning"])
    if lora_on == full:
        raise ConfigError(
            "full_finetuning / lora.enable: moshi-finetune needs exactly one of them true "
            f"(got full_finetuning={full}, lora.enable={lora_on}); fix the file first"
        )
    key = "full_finetuning" if full else "lora.enable"
    mapped(key, "finetune", "full" if full else "lora")
    if lora_on:
        mapped("lora.rank", "lora.rank", v["lora.rank"])
        mapped("lora.scaling", "lora.scaling", v["lora.scaling"])
        mapped("lora.ft_embed", "lora.train_embeddings", bool(v["lora.ft_embed"]))
        if v["lora.ft_embed"]:
            conv.differs.append(f"lora.ft_embed: {KEYS['lora.ft_embed'][1]}")
    elif any(k.startswith("lora.") and k != "lora.enable" for k in flat):
        conv.unmapped.append("lora.rank / lora.scaling / lora.ft_embed: unused with full_finetuning")
    return lora_on


def _model(conv: Conversion, root: Path) -> None:
    """The model keys."""
    v, mapped = conv.values, conv.map
    paths = {
        k: _resolve_path(v[f"moshi_paths.{k}"], root)
        for k in ("moshi_path", "config_path", "mimi_path", "tokenizer_path")
    }
    for k, (p, found) in paths.items():
        if not found:
            conv.warnings.append(
                f"moshi_paths.{k}: {p} does not exist from {root}; fix the path in the output"
            )
    repo = v["moshi_paths.hf_repo_id"]
    if repo:
        conv.set("model.source", "hf")
        mapped("moshi_paths.hf_repo_id", "model.hf_repo", repo)
    else:
        missing = [k for k in ("moshi_path", "config_path", "mimi_path", "tokenizer_path") if not paths[k][0]]
        if missing:
            raise ConfigError(
                f"moshi_paths: hf_repo_id is null, so every file must be given, but {', '.join(missing)} "
                "is not (moshi-finetune could not load this either)"
            )
        conv.set("model.source", "local")
        conv.mapped.append("moshi_paths.hf_repo_id -> model.source: 'local' (no Hub repository)")
    for mf_key, ours in (
        ("moshi_path", "model.moshi_weights"),
        ("config_path", "model.config_path"),
        ("mimi_path", "data.mimi_weights"),
        ("tokenizer_path", "data.tokenizer"),
    ):
        if paths[mf_key][0]:
            mapped(f"moshi_paths.{mf_key}", ours, paths[mf_key][0])
    mapped("gradient_checkpointing", "model.gradient_checkpointing", bool(v["gradient_checkpointing"]))
    dtype = v["param_dtype"]
    if dtype == "float32":
        mapped("param_dtype", "precision", "fp32")
    else:
        mapped("param_dtype", "precision", "auto", "bf16 autocast on GPU, trainable weights float32")
        conv.differs.append(
            "param_dtype: moshi-finetune keeps every weight in bf16 (fp32 copies only for the optimizer) and "
            "runs the forward in bf16; here trainable weights are float32 under bf16 autocast"
        )


def _data(conv: Conversion, root: Path, cache_dir: str | None) -> None:
    """The data keys."""
    v, mapped = conv.values, conv.map
    conv.set("data.source", "manifest")
    train = (
        _manifest(str(v["data.train_data"]), "data.train_data", root, conv) if v["data.train_data"] else None
    )
    if not v["data.train_data"]:
        raise ConfigError("data.train_data: empty in the moshi-finetune config; nothing to train on")
    if train is None:
        raise ConfigError(conv.unmapped[-1])
    mapped("data.train_data", "data.train", train)
    if v["do_eval"]:
        if v["data.eval_data"]:
            ev = _manifest(str(v["data.eval_data"]), "data.eval_data", root, conv)
            if ev is not None:
                mapped("data.eval_data", "data.eval", ev)
                conv.mapped.append("do_eval: true -> evaluation on data.eval")
        else:
            conv.unmapped.append(
                "do_eval: true but data.eval_data is empty (moshi-finetune would fail); no evaluation"
            )
    else:
        conv.set("data.eval", None)
        conv.mapped.append("do_eval: false -> data.eval: null (no evaluation)")
        if v["data.eval_data"]:
            conv.unmapped.append("data.eval_data: not used, do_eval is false")
    mapped("data.shuffle", "data.shuffle", bool(v["data.shuffle"]))
    if v["data.shuffle"]:
        conv.differs.append(
            "data.shuffle: the windows are reshuffled every epoch as there, but by another shuffler, so the "
            "order differs (false keeps the manifest order, the same order as there)"
        )
    frames = math.ceil(float(v["duration_sec"]) * FRAME_RATE)  # as moshi-finetune computes its window length
    seconds = frames / FRAME_RATE
    mapped("duration_sec", "data.duration_sec", seconds, f"{frames} frames of 80 ms")
    if not math.isclose(seconds, float(v["duration_sec"])):
        conv.differs.append(
            f"duration_sec: {v['duration_sec']} s is not a whole number of 80 ms frames; moshi-finetune makes "
            f"windows of {frames} frames starting every {v['duration_sec']} s, here they are {frames} frames "
            f"= {seconds} s apart"
        )
    mapped("text_padding_weight", "loss.text_padding_weight", float(v["text_padding_weight"]))
    mapped(
        "first_codebook_weight_multiplier",
        "loss.first_codebook_weight",
        float(v["first_codebook_weight_multiplier"]),
    )
    conv.set("data.text_overlap", "drop")
    conv.added.append("data.text_overlap: 'drop' (moshi-finetune's interleaving rule, token for token)")
    conv.differs.append(
        "text stream: identical, except past the end of the audio in a file's last, shorter window, where "
        "this project writes the zero token (ignored by the loss) instead of padding or word tails"
    )
    conv.differs.append(
        "audio codes: Mimi encodes each whole file once (scripts/encode_codes.py caches the codes); "
        "moshi-finetune encodes each window on its own, so the first frames of a window can differ"
    )
    if cache_dir is None:
        cache_dir = str(Path(train).parent / "mimi_codes")
    conv.set("data.cache_dir", cache_dir)
    conv.added.append(
        f"data.cache_dir: {cache_dir!r} (Mimi codes, encoded once: scripts/encode_codes.py; --cache-dir)"
    )


def _optim(conv: Conversion) -> None:
    """The optimisation keys."""
    v, mapped = conv.values, conv.map
    mapped("optim.lr", "optim.lr", float(v["optim.lr"]))
    mapped("optim.weight_decay", "optim.weight_decay", float(v["optim.weight_decay"]))
    conv.differs.append(f"optim.weight_decay: {KEYS['optim.weight_decay'][1]}")
    conv.set("optim.schedule", "onecycle")
    mapped("optim.pct_start", "optim.pct_start", float(v["optim.pct_start"]), "optim.schedule: onecycle")
    conv.set("optim.betas", [0.9, 0.95])
    conv.set("optim.eps", 1e-8)
    mapped("max_norm", "optim.max_grad_norm", float(v["max_norm"]))
    conv.added.append(
        "optim.ttt_params_lr: null (the TTT parameters train at optim.lr; configs/moshi7b_lora_ttt.yaml gives "
        "them 1e-4: --optim.ttt_params_lr=1e-4)"
    )


def _checkpoints(conv: Conversion, lora_on: bool) -> None:
    """The evaluation and checkpoints keys."""
    v, mapped = conv.values, conv.map
    mapped("eval_freq", "eval.interval", max(0, int(v["eval_freq"])))
    conv.set("eval.num_batches", 40)
    conv.differs.append(
        "eval batches: moshi-finetune evaluates 40 // processes batches per process, continuing through the "
        "eval set from one evaluation to the next; here every evaluation uses the same first "
        "eval.num_batches: 40 global batches (with N processes, 40 // N gives its batch count)"
    )
    mapped("ckpt_freq", "checkpoint.interval", max(0, int(v["ckpt_freq"])))
    keep = v["num_ckpt_keep"]
    mapped("num_ckpt_keep", "checkpoint.keep_last", 0 if keep is None else int(keep))
    if not v["do_ckpt"]:
        conv.unmapped.append(f"do_ckpt: false: {KEYS['do_ckpt'][1]}")
    conv.set("checkpoint.export_moshi", True)
    if lora_on and not v["save_adapters"]:
        conv.unmapped.append(f"save_adapters: false: {KEYS['save_adapters'][1]}")
    else:
        conv.mapped.append("save_adapters -> checkpoint.export_moshi: true")
    conv.differs.append(
        "checkpoint layout: run_dir/checkpoints/step_NNNNNN/moshi/{config.json, lora.safetensors or "
        "model.safetensors} (moshi.server loads it) + ttt.safetensors, instead of "
        "checkpoints/checkpoint_NNNNNN/consolidated/; resumable (optimizer, schedule, data position)"
    )


def _wandb(conv: Conversion) -> None:
    """The wandb keys."""
    v, mapped = conv.values, conv.map
    if v["wandb.project"]:
        mapped("wandb.project", "wandb.project", v["wandb.project"])
        mapped("wandb.offline", "wandb.mode", "offline" if v["wandb.offline"] else "online")
        if v["wandb.run_name"]:
            mapped("wandb.run_name", "wandb.run_name", v["wandb.run_name"])
