"""Entry point shared by every script: a jsonargparse CLI whose user errors end as one line on stderr.

Three endings are not bugs, so none prints a traceback: a UserError (`error: <what is wrong and what to do>`,
exit status 2), a flag the parser refuses (an unknown flag, a value of the wrong type: the same one line, status 2)
and Ctrl-C at any point (`error: interrupted`, exit status 130, the shell's code for SIGINT).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from litft.base_checkpoint import ensure_checkpoint
from litft.errors import UserError
from litft.kinds import check_checkpoint
from litft.named_data import ensure_data
from litft.train_args import TrainArgs


def run(fn: Callable[..., Any], args: list[str] | None = None) -> Any:
    """Parse the command line into `fn`'s signature (`--help`, `--config`, `--print_config`) and call it.

    A flag is spelled whole: argparse's default would read `--prompt` as the first flag it begins (`--prompt_style`).
    """
    from jsonargparse import auto_cli, auto_parser

    return reported(lambda: auto_cli(fn, args=args, as_positional=False, exit_on_error=False, allow_abbrev=False),
                    parser=lambda: auto_parser(fn, as_positional=False))


def reported(call: Callable[[], Any], parser: Callable[[], Any] | None = None) -> Any:
    """Call `call`; a user error or an interrupt ends the process with its one line. `parser()` builds the command's
    parser, whose flags a misspelt one is matched against."""
    from jsonargparse import ArgumentError

    try:
        return call()
    except UserError as e:
        fail(str(e), 2)
    except ArgumentError as e:  # a flag the command does not take, or a value of the wrong type
        fail(f"{config_error(str(e), sys.argv) or flag_error(str(e))}{suggestion(str(e), parser)}", 2)
    except BrokenPipeError:  # stdout's reader left (`| head`): nothing more to say to it (Python's "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except BaseException as e:
        if interrupted(e):  # also what a Ctrl-C turns into while a file is being written: an error chained to it
            fail("interrupted", 130)
        raise


def flag_error(message: str) -> str:
    """jsonargparse's message on one line, naming the flag: 'Parser key "top_k": Does not validate against any of the
    Union subtypes ... Given value: x' -> "--top_k: expected an integer or null, got 'x'"."""
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message.strip(), re.S)
    if match is None:
        return " ".join(line.strip() for line in message.splitlines())
    key, detail = match.groups()
    expected = re.search(r"Subtypes: \[(.*?)\]\n", detail) or re.search(r"^Expected a (.*)\. Got value", detail, re.S)
    given = re.search(r"(?:Given|Got) value: (.*)$", detail, re.S)
    if expected and given:
        return f"--{key}: expected {type_names(expected.group(1))}, got {given.group(1).strip()!r}"
    return f"--{key}: " + " ".join(line.strip() for line in detail.splitlines())


def suggestion(message: str, parser: Callable[[], Any] | None) -> str:
    """' (did you mean --max_steps?)' for 'unrecognized arguments: --max_step 7'; else ' (--help lists the flags)'."""
    given = re.match(r"unrecognized arguments: (--[\w.-]+)", message)
    flags = [flag for action in parser()._actions for flag in action.option_strings] if given and parser else []
    close = difflib.get_close_matches(given.group(1), flags, n=1, cutoff=0.75) if flags else []
    return f" (did you mean {close[0]}?)" if close else " (--help lists the flags)"


def configs_first(argv: list[str]) -> list[str]:
    """The --config files first, in their order, then every other flag: a flag always wins over a file, wherever it
    stands. (Parsed in place, a file would replace the flags before it without a word.)"""
    configs, rest, i = [], [], 0
    while i < len(argv):
        n = 2 if argv[i] == "--config" and i + 1 < len(argv) else 1
        (configs if argv[i] == "--config" or argv[i].startswith("--config=") else rest).extend(argv[i:i + n])
        i += n
    return configs + rest


def config_error(message: str, argv: list[str]) -> str | None:
    """A --config file's unknown key or broken YAML, named with the file (jsonargparse names neither the file nor,
    for YAML, more than "<unicode string>")."""
    files = [argv[i + 1] if a == "--config" else a.split("=", 1)[1] for i, a in enumerate(argv)
             if (a == "--config" and i + 1 < len(argv)) or a.startswith("--config=")]
    contents = {path: read_yaml(path) for path in files}  # None: not YAML
    if key := re.match(r"Option '([^']+)' is not accepted", message):
        holder = next((p for p, c in contents.items() if isinstance(c, dict) and key.group(1).split(".")[0] in c), None)
        return f"--config {holder}: unknown key '{key.group(1)}'" if holder else None
    if message.startswith("Problems parsing config") and (broken := [p for p, c in contents.items() if c is None]):
        where = re.sub(r'\s*in "<unicode string>"', "", message.split(":", 1)[1]).strip()
        return f"--config {broken[0]} is not valid YAML: {' '.join(where.split())}"
    return None


def read_yaml(path: str) -> object | None:
    """The YAML in `path`; None when it cannot be read or parsed (and {} for an empty file)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None


def type_names(types: str) -> str:
    """"<class 'int'>, <class 'NoneType'>" -> "an integer or null"; "typing.Literal['a', 'b']" -> "one of 'a', 'b'"."""
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "NoneType": "null", "str": "a string",
             "list": "a list, as [a, b]"}
    found = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>|typing\.Literal\[([^\]]*)\]", types)
    return " or ".join(names.get(name, name) if name else f"one of {choices}" for name, choices in found) or types


def interrupted(e: BaseException | None) -> bool:
    """True when `e`, or an exception it was raised while handling, is a KeyboardInterrupt."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def fail(message: str, status: int) -> None:
    """Print `error: message` once — from the first process of a multi-process run only — and exit."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # line and newline in one write: other processes print meanwhile
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(status)


def run_finetune(recipe: Callable[..., Any], args: list[str] | None = None, **defaults: Any) -> Any:
    """The CLI of a finetune/ recipe: the shared TrainArgs flags plus the recipe's own keyword arguments.

    `recipe(train_args, **method_flags)`; `defaults` override TrainArgs defaults (e.g. learning_rate=9e-3 for the
    adapter), so `--help` and `--print_config` show the values this recipe really uses.
    Every flag value is checked first (TrainArgs.validate); then the default base checkpoint is converted and a
    named --data set prepared when they are missing (litft/base_checkpoint.py, litft/named_data.py) — here,
    before Fabric starts other processes.
    """
    return reported(lambda: _finetune(recipe, args, defaults), parser=lambda: finetune_parser(recipe, defaults))


def _finetune(recipe: Callable[..., Any], args: list[str] | None, defaults: dict) -> Any:
    parser = finetune_parser(recipe, defaults)
    flags = parser.parse_args(configs_first(sys.argv[1:] if args is None else args)).as_dict()
    flags.pop("config", None)
    train = TrainArgs(**{k: flags.pop(k) for k in list(flags) if k in TrainArgs.__dataclass_fields__})
    train.validate()
    ensure_checkpoint(train.checkpoint_dir)
    check_checkpoint(train.checkpoint_dir)
    ensure_data(train.data, train.checkpoint_dir)
    return recipe(train, **flags)


def finetune_parser(recipe: Callable[..., Any], defaults: dict) -> Any:
    """TrainArgs' flags, then the recipe's own, then --config; `defaults` replace TrainArgs' defaults."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=(recipe.__doc__ or "").strip().splitlines()[0] if recipe.__doc__ else None,
                            exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe (see recipes/)")
    parser.add_class_arguments(TrainArgs, nested_key=None)
    parser.add_function_arguments(recipe, nested_key=None, skip={"train"})
    parser.set_defaults(**defaults)
    return parser
