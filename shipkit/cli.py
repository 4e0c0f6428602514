"""The click CLI: a thin layer that parses options, calls one stage function, prints its
result and maps `ShipkitError` to exit codes (0 ok, 1 a check failed, 2 usage/input error)."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click

from shipkit import __version__
from shipkit.errors import EXIT_CHECK_FAILED, EXIT_USAGE, ShipkitError


class ShipkitGroup(click.Group):
    """Turns our exceptions (and any other) into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShipkitError as error:
            _fail(ctx, str(error), error.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except OSError as error:  # a safety net: a file problem no stage turned into a ShipkitError
            _fail(ctx, _os_error_line(error), EXIT_CHECK_FAILED)
        except Exception as error:  # a bug of ours: still one line unless --debug
            _fail(ctx, f"internal error: {type(error).__name__}: {error}", EXIT_USAGE)


def _fail(ctx: click.Context, message: str, exit_code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        traceback.print_exc()
    click.echo(f"error: {' '.join(message.splitlines())}", err=True)
    ctx.exit(exit_code)


def _os_error_line(error: OSError) -> str:
    """`FILE: strerror` (`SOURCE -> DESTINATION: strerror` for a rename)."""
    files = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error)
    return f"{files}: {reason}" if files else reason


@click.group(cls=ShipkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shipkit")
@click.option("--debug", is_flag=True, help="Show the Python traceback on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """shipkit: train, checkpoint, export, quantize, parity-gate, card and push a code LM."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_commands() -> None:
    """Each stage keeps its click commands in `shipkit/commands/<stage>.py`."""
    from shipkit.commands import register_all

    register_all(main)


_register_commands()

if __name__ == "__main__":
    sys.exit(main())
