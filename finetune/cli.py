"""The command line of ``train.py`` and ``scripts/encode_codes.py``: ``CONFIG [--section.key=value ...]``.

Parsed completely (by python-fire) before any work, so a stray argument is refused at once instead of
after a training run. Overrides are ``--key=value``, ``--key value`` or a bare ``--key`` (true); fire
reads a value as a Python literal where it can (``--ttt.layers=[0,6]``, ``--optim.lr=3e-5``), and the
config schema types the rest (YAML syntax: ``--data.eval=null``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import fire

from .schema import ConfigError


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """(config file, ``{dotted key: value}``) of a command line, read by python-fire; ConfigError for a
    stray argument. Fire would call a command and only then complain about what it could not consume
    (a training run long finished), so the command here only collects its arguments: a stray positional
    argument lands in ``extra`` and is refused before any work."""
    parsed: dict[str, Any] = {}

    def collect(config: str | None = None, *extra: Any, **overrides: Any) -> None:
        if extra:
            raise ConfigError(
                f"unexpected argument {str(extra[0])!r}: after the config file only --section.key=value "
                "overrides are accepted (nothing was run)"
            )
        parsed.update(config=None if config is None else str(config), overrides=overrides)

    fire.Fire(collect, command=list(argv), name="train.py")
    return parsed["config"], parsed["overrides"]


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
