"""One line on stderr and an exit status, never a traceback: the error wrapper of both CLIs.

`packer` (`packer.cli.main`) and `python -m trainer.run` (`trainer.run.main`) run their Click
command through `run_one_line`, the one place each of them catches `PackerError`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from packer.errors import DATA, USAGE, PackerError

__all__ = ["one_line", "run_one_line"]


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def run_one_line(command: click.Command, args: Any, prog_name: str | None, prefix: str, *,
                 interrupted: str | None = None, **extra: Any) -> Any:
    """Run `command` (Click, not standalone) and turn what the user should see into one line on
    stderr after `prefix`, then exit: click's usage errors 2 and its other errors their code, a
    `PackerError` its `exit_code`, an OSError outside any output folder 1, Ctrl-C 130 (printing
    `interrupted` first, if given). Messages are redacted, also of the storage options a command
    leaves in ``ctx.obj["storage_options"]``. With `--json` among the arguments, a failure also
    prints one object on stdout, ``{"ok": false, "exit_code": N, "error": "..."}``, so a pipeline
    parsing stdout always gets one. Returns what the command returns."""
    from packer.storage.fs import redact

    obj: dict[str, Any] = extra.pop("obj", None) or {}
    as_json = "--json" in (sys.argv[1:] if args is None else list(args))

    def fail(msg: str, code: int) -> NoReturn:
        if as_json:
            click.echo(json.dumps({"ok": False, "exit_code": code, "error": one_line(msg)}))
        click.echo(f"{prefix}{one_line(msg)}", err=True)
        sys.exit(code)

    try:
        return click.Command.main(command, args, prog_name, standalone_mode=False, obj=obj, **extra)
    except click.UsageError as e:
        fail(e.format_message(), USAGE)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except PackerError as e:
        fail(redact(str(e), obj.get("storage_options")) or type(e).__name__, e.exit_code)
    except (KeyboardInterrupt, click.Abort):
        if interrupted:
            click.echo(interrupted, err=True)
        sys.exit(130)
    except OSError as e:  # the environment failed (disk, permissions) outside any output folder
        where = f": {e.filename}" if e.filename else ""
        fail(f"{e.strerror or str(e)}{where}", DATA)
