"""Shared command-line plumbing: one-line errors with exit status 2, config from flags."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from collections.abc import Callable

from mmsa.config import Config, parse_overrides, refuse_derived
from mmsa.errors import DISK_FULL, ConfigError, UserError

OWN_PACKAGES = ("mmsa", "search", "bench")  # a missing module of these is a bug, not a missing install
INSTALL = "pip install -c constraints.txt -e '.[dev]'"


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI entry point: a UserError, a full disk or a missing dependency becomes one line on
    stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if not package or package in OWN_PACKAGES:
            raise
        # Commands import their libraries late (start-up speed), so a half-done install shows here.
        print(f"error: the Python package '{package}' is not installed ({e}); install the project's "
              f"dependencies from the repository's root: {INSTALL}", file=sys.stderr)
        code = 2
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        # A full disk that no writer turned into a DiskFullError (naming its folder) already.
        print(f"error: {e.filename or 'a file being written'}: no space left on the device", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


def launch(module: str, argv: list[str] | None = None) -> None:
    """Run the `main` of a command's module, imported inside run_main: a package missing where that module is
    imported is then one line too, not a traceback."""
    def main(args: list[str] | None) -> int | None:
        return importlib.import_module(module).main(args)
    run_main(main, argv)


def read_yaml(path: str | Path) -> dict:
    import yaml  # here, not at the top: the entry points import this module before run_main guards them

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: invalid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def config_from_args(data_dir: str | None, overrides: list[str], config_file: str | None = None) -> Config:
    cfg = Config()
    if config_file:
        cfg = cfg.updated(refuse_derived(read_yaml(config_file), str(config_file)), source=str(config_file))
    cfg = cfg.updated(refuse_derived(parse_overrides(overrides or []), "--set"), source="--set")
    return cfg if data_dir is None else cfg.updated({"data_dir": data_dir}, source="--data")


def quiet_libraries() -> None:
    """Keep library chatter (HF warnings, tokenizer fork notices) off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
