"""The `packer` CLI's parameter types and shared options: byte sizes, dataset folders or URLs,
local folders, storage options, non-empty paths."""

from __future__ import annotations

import os
import re

import click

# Byte sizes are parsed here, not by a library: pydantic.ByteSize accepts the same strings (256MB,
# 1GiB, 1k, 500000) but adds pydantic + pydantic_core (9.6 MB, 3 packages) to the base install and
# 330 ms to the first parse (measured on this project's venv), for these 12 lines.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


class ByteSize(click.ParamType):
    """Accepts 256MB, 1GiB, 500000 ..."""

    name = "bytes"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size like 256MB or 1GiB", param, ctx)
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class DatasetArg(click.ParamType):
    """A packed dataset: an existing folder, or a URL (s3://, gs://, http(s)://, file://)."""

    name = "folder|url"

    def convert(self, value, param, ctx):
        from packer.storage.fs import is_url

        value = str(value)
        if not is_url(value) and not os.path.isdir(value):
            self.fail(f"{value!r} is not a folder or a URL", param, ctx)
        return value


class LocalFolderArg(click.ParamType):
    """An existing local folder; a URL gets a hint (these commands do not read storage)."""

    name = "folder"

    def convert(self, value, param, ctx):
        from packer.storage.fs import is_url

        value = str(value)
        if is_url(value):
            cmd = ctx.info_name if ctx is not None else "this command"
            self.fail(f"{value!r} is a URL; {cmd} works on a local folder (packer pull URL DIR first)", param, ctx)
        if not os.path.isdir(value):
            self.fail(f"{value!r} is not a folder", param, ctx)
        return value


DATASET = DatasetArg()
LOCAL_FOLDER = LocalFolderArg()
# JSON or @file.json; secrets are better passed by env var or file than on the command line
STORAGE_OPTIONS = click.option(
    "--storage-options", "storage_options", envvar="PACKER_STORAGE_OPTIONS", default=None, metavar="JSON|@FILE",
    help="fsspec storage options for URLs (endpoint, credentials...), as JSON or @file.json; env PACKER_STORAGE_OPTIONS. "
    "Default: AWS_* env vars (incl. AWS_ENDPOINT_URL) and AWS config files.")


def not_empty(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`-o ""` would silently mean the current folder: a usage error instead."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must not be empty", param=param)
    return value
