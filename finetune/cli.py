"""The command line of ``train.py`` and ``scripts/encode_codes.py``: ``CONFIG [--section.key=value ...]``.

Parsed completely before any work, so a stray argument is refused at once instead of after a
training run. Overrides are ``--key=value``, ``--key value`` or a bare ``--key`` (true); values are
strings, typed by the config schema (YAML syntax: ``--ttt.layers=[0,6]``, ``--data.eval=null``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .schema import ConfigError


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """(config file, ``{dotted key: value}``); ConfigError for anything else."""
    config: str | None = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            key = key.replace("-", "_")
            if key == "config" and config is None:
                config = value
            elif key in overrides:
                raise ConfigError(f"--{key} is given twice")
            else:
                overrides[key] = value
        elif config is None and not arg.startswith("-"):
            config = arg
        else:
            raise ConfigError(
                f"unexpected argument {arg!r}: after the config file only --section.key=value overrides "
                "are accepted (nothing was run)"
            )
        i += 1
    return config, overrides


def run_main(main: Callable[[list[str]], int], doc: str | None) -> None:
    """``sys.exit(main(argv))``; ``-h`` prints ``doc``; a ConfigError is one ``config error:`` line and
    exit status 2, without a traceback."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(doc or "")
        sys.exit(0)
    try:
        sys.exit(main(argv))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
