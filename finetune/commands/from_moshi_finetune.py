"""Turn a kyutai-labs/moshi-finetune YAML into this project's training config, with TTT added.

    python scripts/from_moshi_finetune.py mf.yaml -o configs/my_run.yaml
    python scripts/from_moshi_finetune.py mf.yaml -o configs/my_run.yaml --mf-root ~/moshi-finetune \\
        --init-from ~/runs/mf/checkpoints/checkpoint_002000/consolidated --ttt.eta=0.01 --ttt.layers=[0,8,16,24]

Every moshi-finetune key is mapped or reported with the reason it is not, and what behaves
differently here is listed. Keys the file leaves out take moshi-finetune's defaults (not this
project's), so the run trains as the moshi-finetune run would, plus TTT. ``--section.key=value``
flags set anything in the output: TTT settings (this project's defaults otherwise), or
``--ttt.enabled=false`` for the same run without TTT. Relative paths in the file are resolved from
``--mf-root`` (where moshi-finetune ran; default: here). A file holding a wandb API key is refused:
export WANDB_API_KEY instead. The output is the full resolved config (every key explicit).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import yaml

from finetune.args import TrainConfig, config_to_yaml
from finetune.compat.convert import convert
from finetune.schema import ConfigError, apply_overrides, from_dict, parse_key_values
from moshi_ttt.files import write_text_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mf_config", type=Path, help="moshi-finetune YAML (e.g. its example/moshi_7B.yaml)")
    p.add_argument("-o", "--output", type=Path, required=True, help="this project's config to write")
    p.add_argument(
        "--mf-root", type=Path, default=Path("."), help="where moshi-finetune ran (its relative paths)"
    )
    p.add_argument("--cache-dir", help="Mimi code cache (default: mimi_codes/ beside the train manifest)")
    p.add_argument("--init-from", help="start from a moshi-finetune checkpoint (its consolidated/ directory)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        p.error(f"unrecognised arguments {bad}; settings of the output are --section.key=value")
    try:
        overrides = parse_key_values(rest)
    except ConfigError as e:
        p.error(str(e))
    if args.output.exists() and not args.force:
        p.error(f"{args.output} exists; pass --force to overwrite it")
    if not args.mf_config.is_file():
        p.error(f"{args.mf_config} not found")
    try:
        mf = yaml.safe_load(args.mf_config.read_text()) or {}
    except yaml.YAMLError as e:
        p.error(f"{args.mf_config} is not valid YAML: {e}")
    if not isinstance(mf, dict):
        p.error(f"{args.mf_config}: the top level must be a mapping")

    try:
        conv = convert(mf, mf_root=args.mf_root, cache_dir=args.cache_dir)
        if args.init_from:
            overrides.setdefault("model.init_from", str(Path(args.init_from).expanduser().resolve()))
        data = apply_overrides(conv.config, overrides)
        cfg = from_dict(TrainConfig, data)
        cfg.check()
    except ConfigError as e:
        print(f"error: {e}\nnothing was written", file=sys.stderr)
        return 2
    except ValueError as e:  # TTTConfig validation names its field
        print(f"error: {e}\nnothing was written", file=sys.stderr)
        return 2
    for k, value in overrides.items():
        conv.added.append(f"{k}: {value} (from the command line)")
    t = cfg.ttt
    if t.enabled:
        layers = t.layers if t.layers is not None else f"from {t.start_layer} every {t.layer_frequency}"
        conv.added.append(
            f"ttt: enabled, variant {t.variant}, layers {layers}, chunk_size {t.chunk_size}, eta {t.eta}, "
            f"target_source {t.target_source} (change with --ttt.KEY=VALUE; --ttt.enabled=false: no TTT)"
        )
    else:
        conv.added.append("ttt: disabled (the moshi-finetune run as it is, in this project)")

    header = (
        f"# Converted from the moshi-finetune config {args.mf_config} on {date.today()} by\n"
        f"# scripts/from_moshi_finetune.py (the report it printed lists what maps and what differs).\n"
        f"#   python scripts/encode_codes.py {args.output} --device=cuda   # Mimi codes, once\n"
        f"#   torchrun --nproc-per-node N train.py {args.output}\n"
    )
    write_text_atomic(args.output, header + config_to_yaml(cfg))
    print(f"{args.mf_config} (moshi-finetune) -> {args.output}\n")
    print(conv.report())
    print(
        f"\nnext:\n  python scripts/encode_codes.py {args.output} --device=cuda\n"
        f"  torchrun --nproc-per-node N train.py {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
