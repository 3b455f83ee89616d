"""The `sessions` command line: a thin client of the SDK (it imports nothing from meshd).

Exit status: 0 success, 1 not found or failed, 2 usage error. Errors are one line on
stderr, never a traceback. Read commands take --json for machine-readable output.

One module per family of commands (registry, messages, memory, node, claims); each registers its
commands on the one click group of `_base`.
"""

from __future__ import annotations

import sys

import click

from sessions import SessionsError
from sessions.cli import (  # noqa: F401  (they register)
    agents, claims, mcp, memory, messages, monitor, node, registry,
)
from sessions.cli._base import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Entry point: SDK errors become one ❌ line and exit 1; usage errors exit 2."""
    try:
        cli.main(standalone_mode=False, prog_name="sessions")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SessionsError as exc:
        click.echo(f"❌ {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:                    # never a traceback for the user
        click.echo(f"❌ unexpected error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
