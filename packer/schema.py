"""The checks behind `packer/format.py`'s contract, for data that may be hostile.

A manifest or labels.npz may come from anywhere (a download, a bucket, an edited file), so
nothing in it is used before it has been checked here: size, encoding, nesting, JSON types
and ranges, names that become folders, paths that must stay inside the dataset, and the
dtypes, shapes and value ranges of the label arrays. Errors name the field and its JSON type,
never the file's content. This module imports nothing from `packer` but its error base, so `format` can use it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import numpy as np

from packer.errors import DataFailed, PackerError

# Split names become folder and file names under the output folder, so they are held to
# the same safe alphabet as keys: no dots, slashes or empty names can leave `-o`.
SPLIT_NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A manifest lists shards, not samples (~250 bytes a shard): 64 MiB is far above any real one.
MANIFEST_MAX_BYTES = 64 << 20
MAX_JSON_DEPTH = 64  # a real manifest nests 6 deep; deeper input would exhaust recursion on rewrite


class FormatError(PackerError, ValueError):
    """A packed folder or record does not follow this contract."""


class DamagedDataset(FormatError, DataFailed):
    """A finished dataset (its manifest is there) whose files are missing or disagree with it:
    the data failed, not the request (exit 1)."""


def check_split_name(name: object) -> str:
    """Return `name` if it is a safe split name ([A-Za-z0-9_-], 1..64 chars), else raise FormatError."""
    if not isinstance(name, str) or not SPLIT_NAME_RULE.fullmatch(name):
        raise FormatError(f"invalid split name {name!r:.80}: use 1-64 characters from [A-Za-z0-9_-]")
    return name


def check_relpath(p: str) -> str:
    """Return `p` if it is a relative path that stays inside the dataset folder, else raise FormatError."""
    parts = p.split("/")
    if (not p or p.startswith("/") or "\\" in p or "://" in p or any(x in ("", ".", "..") for x in parts)
            or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in p)):
        # one spelling per file ("a//b", "a/./b" would let it be listed twice); no control or format
        # characters (C0, C1, bidi overrides, line separators could forge output lines)
        raise FormatError(f"unsafe path in manifest: {p!r:.80}")
    return p


def load_json(data: bytes, where: str) -> Any:
    """Parse the bytes of a small JSON file read from `where`: FormatError (one line) if it is too
    large, not UTF-8, not JSON or nested deeper than MAX_JSON_DEPTH."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise FormatError(f"{where}: larger than {MANIFEST_MAX_BYTES >> 20} MiB: not a packed dataset's manifest")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise FormatError(f"{where} is not UTF-8 text (byte {e.start}): not a packed dataset's manifest") from None
    except RecursionError:
        raise FormatError(f"{where}: JSON nested too deeply: not a packed dataset's manifest") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python parses
        raise FormatError(f"{where} is not valid JSON: {str(e).splitlines()[0][:120]}") from None
    check_depth(obj, where)
    return obj


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (a repeated key makes the file ambiguous)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {dup!r:.60} occurs twice in one object")
    return d


def check_depth(obj: Any, where: str) -> None:
    """FormatError if `obj` nests lists/objects deeper than MAX_JSON_DEPTH (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels: not a packed dataset's manifest")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def describe(v: Any) -> str:
    """A bad value as an error shows it: small ints as themselves, anything else by JSON type, never its text."""
    if type(v) is int and abs(v) < 10**15:
        return str(v)
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number", int: "a number"}
    return kinds.get(type(v), "null" if v is None else type(v).__name__)


def fields(d: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """`d` if it is a JSON object with exactly `keys`, else FormatError naming the first missing/unknown one."""
    if not isinstance(d, dict):
        raise FormatError(f"{where} must be a JSON object, got {describe(d)}")
    missing, unknown = [k for k in keys if k not in d], [k for k in d if k not in keys]
    if missing or unknown:
        raise FormatError(f"{where} lacks the field {missing[0]!r}" if missing
                          else f"{where} has an unknown field {unknown[0]!r:.60}")
    return d


def count(v: Any, where: str, lo: int = 0) -> int:
    """`v` if it is a JSON integer >= lo (not a boolean, not a string of digits), else FormatError."""
    if type(v) is not int or v < lo:  # type(), not isinstance: JSON true is not 1
        raise FormatError(f"manifest {where} must be an integer >= {lo}, got {describe(v)}")
    if v >= 1 << 63:  # no count or size reaches it; larger ones overflow float and C conversions
        raise FormatError(f"manifest {where} must be below 2^63, got {describe(v)}")
    return v


def text(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise FormatError(f"manifest {where} must be a string, got {describe(v)}")
    return v


def json_list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise FormatError(f"manifest {where} must be a list, got {describe(v)}")
    return v


def json_object(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise FormatError(f"manifest {where} must be a JSON object, got {describe(v)}")
    return v


# The manifest schema: exactly these keys at each level (an unknown key means another writer or version).
MANIFEST_KEYS = ("format_version", "format", "size", "names", "source", "options", "packer_version", "splits")
SPLIT_KEYS = ("num_samples", "num_boxes", "class_counts", "labels", "shards")
SHARD_KEYS = ("path", "num_samples", "bytes", "sha256", "index")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_manifest(d: Any, version: int, formats: tuple[str, ...]) -> dict[str, Any]:
    """`d` if it is a manifest object of format `version` in one of `formats`: exact keys, JSON types,
    ranges, safe split names and paths (FormatError naming the first field that does not fit)."""
    check_depth(d, "manifest")
    d = fields(d, "manifest", MANIFEST_KEYS)
    if count(d["format_version"], "format_version", 1) != version:
        raise FormatError(f"manifest format_version {d['format_version']} is not supported (this build reads {version})")
    if text(d["format"], "format") not in formats:
        raise FormatError(f"manifest format {d['format']!r:.40} is not one of {', '.join(formats)}")
    if not all(isinstance(n, str) for n in json_list(d["names"], "names")):
        raise FormatError("manifest names must be a list of strings")
    count(d["size"], "size", 1)
    json_object(d["source"], "source")
    json_object(d["options"], "options")
    text(d["packer_version"], "packer_version")
    for name, s in json_object(d["splits"], "splits").items():
        _check_split(s, f"splits.{check_split_name(name)}")
    files = [p for s in d["splits"].values() for p in [s["labels"], *(x for sh in s["shards"]
                                                                    for x in (sh["path"], sh["index"]) if x)]]
    if len(set(files)) != len(files):  # two entries for one file: counted twice, read twice
        seen: set[str] = set()
        raise FormatError(f"manifest lists the file {next(p for p in files if p in seen or seen.add(p))!r:.80} twice")
    return d


def _check_split(d: Any, where: str) -> None:
    d = fields(d, f"manifest {where}", SPLIT_KEYS)
    count(d["num_samples"], f"{where}.num_samples")
    count(d["num_boxes"], f"{where}.num_boxes")
    for i, c in enumerate(json_list(d["class_counts"], f"{where}.class_counts")):
        count(c, f"{where}.class_counts[{i}]")
    check_relpath(text(d["labels"], f"{where}.labels"))
    for i, sh in enumerate(json_list(d["shards"], f"{where}.shards")):
        _check_shard(sh, f"{where}.shards[{i}]")


def _check_shard(d: Any, where: str) -> None:
    d = fields(d, f"manifest {where}", SHARD_KEYS)
    if not _SHA256_HEX.fullmatch(text(d["sha256"], f"{where}.sha256")):
        raise FormatError(f"manifest {where}.sha256 is not 64 lowercase hex digits")
    if d["index"] is not None:
        check_relpath(text(d["index"], f"{where}.index"))
    check_relpath(text(d["path"], f"{where}.path"))
    count(d["num_samples"], f"{where}.num_samples")
    count(d["bytes"], f"{where}.bytes")


# ------------------------------------------------------------------------ records

KEY_MAX_LEN = 80  # keeps tar member names inside ustar's 100-byte name field
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
SOURCE_MAX_BYTES = 4096  # a path under the dataset root: Linux's PATH_MAX (the LMDB header holds up to 65535)


def check_key(key: str) -> None:
    """Raise FormatError unless `key` is safe for every reader."""
    if not isinstance(key, str) or not key or len(key) > KEY_MAX_LEN or KEY_UNSAFE.search(key):
        raise FormatError(f"unsafe sample key {key!r:.100}: use [A-Za-z0-9_-], at most {KEY_MAX_LEN} chars")


def record_problem(source: Any, jpeg: Any, sizes: tuple[Any, ...]) -> str | None:
    """What is wrong with a record's metadata as a reader found it (None if nothing): a hostile
    shard's strings for numbers or a 70,000-character path crashed the writers of `convert`."""
    if not isinstance(source, str) or "\0" in source or len(source.encode("utf-8", "surrogatepass")) > SOURCE_MAX_BYTES:
        return f"source is not a path of at most {SOURCE_MAX_BYTES} bytes"
    if not isinstance(jpeg, bytes | bytearray | memoryview):
        return "image bytes of another type"
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) or not 1 <= v < 1 << 31 for v in sizes):
        return "image sizes must be integers within 1..2^31-1"
    return None


# ------------------------------------------------------------------------ label arrays

# dtype of each numeric field of labels.npz (keys and sources: any unicode string dtype)
LABEL_DTYPES = {"offsets": np.int64, "cls": np.int32, "boxes": np.float32, "hw": np.int32, "orig_hw": np.int32,
                "shard": np.int32, "pos": np.int64}


def label_problem(a: dict[str, np.ndarray], num_classes: int | None, num_shards: int | None) -> str | None:
    """What is wrong with loaded label arrays (None if nothing): the checks that keep a hostile
    labels.npz from indexing out of range, or feeding NaN boxes or unknown classes to training."""
    for k, v in a.items():
        want = LABEL_DTYPES.get(k)
        if (v.dtype.kind != "U") if want is None else (v.dtype != want):
            return f"{k} has dtype {v.dtype}, expected {np.dtype(want) if want else 'str'}"
    n = len(a["keys"]) if a["keys"].ndim == 1 else -1
    m = len(a["cls"]) if a["cls"].ndim == 1 else -1
    shapes = {"keys": (n,), "sources": (n,), "offsets": (n + 1,), "cls": (m,), "boxes": (m, 4), "hw": (n, 2),
              "orig_hw": (n, 2), "shard": (n,), "pos": (n,)}
    bad = [k for k, shape in shapes.items() if a[k].shape != shape]
    if bad:
        return f"{bad[0]} has shape {a[bad[0]].shape}, expected {shapes[bad[0]]}"
    off = a["offsets"]
    if off[0] != 0 or off[-1] != m or (np.diff(off) < 0).any():
        return "offsets do not rise from 0 to the number of boxes"
    checks = [
        (not np.isfinite(a["boxes"]).all(), "boxes hold NaN or infinite values"),
        ((a["cls"] < 0).any() or (num_classes is not None and (a["cls"] >= num_classes).any()),
         f"class ids outside 0..{'' if num_classes is None else num_classes - 1}"),
        ((a["hw"] < 1).any() or (a["orig_hw"] < 1).any(), "image sizes below 1 pixel"),
        ((a["shard"] < 0).any() or (num_shards is not None and (a["shard"] >= num_shards).any()),
         f"shard numbers outside 0..{'' if num_shards is None else num_shards - 1}"),
        ((a["pos"] < 0).any(), "negative record positions"),
        (((a["boxes"] < 0) | (a["boxes"] > 1)).any() or (a["boxes"][:, 2:] <= 0).any(),
         "boxes outside [0, 1] or of no size (packer clips or drops those)"),
        (len(np.unique(a["keys"])) != n, "a sample key occurs twice"),
        (a["sources"].dtype.itemsize > 4 * SOURCE_MAX_BYTES or a["keys"].dtype.itemsize > 4 * KEY_MAX_LEN,
         f"sample keys or source paths longer than a record may hold ({KEY_MAX_LEN} / {SOURCE_MAX_BYTES})"),
    ]
    return next((msg for failed, msg in checks if failed), None)
