"""Entry point shared by every script: a jsonargparse CLI whose user errors end as one line on stderr."""

from __future__ import annotations

import sys
from typing import Any, Callable

from litft.errors import UserError


def run(fn: Callable[..., Any], args: list[str] | None = None) -> Any:
    """Parse the command line into `fn`'s signature (`--help`, `--config`, `--print_config`) and call it."""
    from jsonargparse import auto_cli

    try:
        return auto_cli(fn, args=args, as_positional=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def run_finetune(recipe: Callable[..., Any], args: list[str] | None = None, **defaults: Any) -> Any:
    """The CLI of a finetune/ recipe: the shared TrainArgs flags plus the recipe's own keyword arguments.

    `recipe(train_args, **method_flags)`; `defaults` override TrainArgs defaults (e.g. learning_rate=9e-3 for the
    adapter), so `--help` and `--print_config` show the values this recipe really uses.
    Before the recipe runs, the default base checkpoint is converted and a named --data set prepared when they
    are missing (litft/base_checkpoint.py, litft/named_data.py) — here, before Fabric starts other processes.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    from litft.base_checkpoint import ensure_checkpoint
    from litft.named_data import ensure_data
    from litft.train import TrainArgs

    parser = ArgumentParser(description=(recipe.__doc__ or "").strip().splitlines()[0] if recipe.__doc__ else None)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe (see recipes/)")
    parser.add_class_arguments(TrainArgs, nested_key=None)
    parser.add_function_arguments(recipe, nested_key=None, skip={"train"})
    parser.set_defaults(**defaults)
    flags = parser.parse_args(args).as_dict()
    flags.pop("config", None)
    train = TrainArgs(**{k: flags.pop(k) for k in list(flags) if k in TrainArgs.__dataclass_fields__})
    try:
        ensure_checkpoint(train.checkpoint_dir)
        ensure_data(train.data, train.checkpoint_dir)
        return recipe(train, **flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
