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
