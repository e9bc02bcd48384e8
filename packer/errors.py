"""The one root of every error packer and trainer report to a user: `PackerError`.

Each CLI (`packer`, `python -m trainer.run`) catches `PackerError` in one place and prints its
message as one line, exiting with its `exit_code`: 2 for usage errors (bad options, a folder or
file that is not what was asked for: the default), 1 when the data or the disk failed
(`DataFailed`). Families keep `ValueError`/`OSError` as a second base where callers catch those.
This module imports nothing of the project, so every module can use it; `PackerError.like` re-raises
an error as another family while keeping its exit status.
"""

from __future__ import annotations

from typing import Self

__all__ = ["USAGE", "DATA", "DataFailed", "PackerError"]

USAGE = 2  # the user's to fix: options, paths, what a folder holds
DATA = 1  # the data or the disk failed (verify mismatch, --strict problems, a full disk, a corrupt shard read)


class PackerError(Exception):
    """A failure to report as one line; `exit_code` is the process's exit status for it."""

    exit_code: int = USAGE

    @classmethod
    def like(cls, cause: BaseException, message: str) -> Self:
        """`message` as this class, keeping the exit status of `cause` where it has one: a
        damaged dataset reported by another layer stays exit 1."""
        err = cls(message)
        err.exit_code = getattr(cause, "exit_code", cls.exit_code)
        return err


class DataFailed(PackerError):
    """The data or the disk failed rather than the request: exit 1."""

    exit_code = DATA
