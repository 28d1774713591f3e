"""Coming from kyutai-labs/moshi-finetune: :mod:`.convert` (its config keys and YAML files) and
:mod:`.init_from` (starting a run from its checkpoints). Both are importable from here (the old
``finetune.mf_compat`` names)."""

from .convert import KEYS, MF_DEFAULTS, Conversion, convert, refuse_moshi_finetune_keys, schema_has
from .init_from import InitFrom, init_from_files, init_state, merge_lora, merged_config

__all__ = [
    "KEYS",
    "MF_DEFAULTS",
    "Conversion",
    "InitFrom",
    "convert",
    "init_from_files",
    "init_state",
    "merge_lora",
    "merged_config",
    "refuse_moshi_finetune_keys",
    "schema_has",
]
