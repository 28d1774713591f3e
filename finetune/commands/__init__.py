"""The command-line programs, one module each with its ``main`` (``cli`` where the command line is
``CONFIG --key=value``). Installed as ``moshi-ttt-<name>`` console commands (pyproject.toml's
``[project.scripts]``); ``scripts/<name>.py`` and ``train.py`` call the same functions."""
