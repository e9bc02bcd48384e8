"""Reading and checking an ultralytics dataset yaml (data.yaml) without trusting it.

A yaml is parsed to its node graph first and its size *after* alias expansion is checked
before any Python object is built, so a 1 KB "billion laughs" file fails with one line
instead of filling memory. Errors never quote the file: only line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from packer.sources.base import SourceError, safe_text

YAML_SPLITS = ("train", "val", "test")
MAX_YAML_BYTES = 8 << 20  # a names list of 100k classes is ~2 MB
MAX_YAML_NODES = 1_000_000  # scalars + collections after alias expansion


def _quoted(m: re.Match) -> str:
    """Token names (',' ']' '<block end>') stay; anything longer could be the file's text."""
    inner = m.group(0)[1:-1]
    return m.group(0) if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "..."


def _problem(e: yaml.YAMLError) -> str:
    """PyYAML's message (without the file snippet it appends), with line and column."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = re.sub(r"'[^']*'|\"[^\"]*\"", _quoted, str(getattr(e, "problem", "") or "invalid syntax"))
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes that `node` stands for once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ValueError("an alias refers to itself (recursive structure)")
    active.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(v, memo, active) for v in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    if n > MAX_YAML_NODES:
        raise ValueError(f"aliases expand to more than {MAX_YAML_NODES:,} nodes")
    memo[key] = n
    return n


def read_yaml(path: Path) -> Any:
    """Parse a yaml file safely (size and alias-expansion limits); SourceError, one line."""
    name = path.name
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise SourceError(f"{name}: larger than {MAX_YAML_BYTES >> 20} MiB; not a dataset yaml")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise SourceError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SourceError(f"{name}: not UTF-8 text") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise SourceError(f"{name}: not valid YAML: {_problem(e)}") from None
    except ValueError as e:
        raise SourceError(f"{name}: {e}") from None
    except RecursionError:
        raise SourceError(f"{name}: nested too deeply") from None
    finally:
        loader.dispose()


@dataclass
class DatasetYaml:
    """The checked fields of a dataset yaml."""

    names: list[str] | None  # None: neither names nor nc given
    kpt_shape: tuple[int, int] | None
    has_splits: bool
    names_from_nc: bool = False


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_names(names: Any, where: str) -> list[str]:
    """data.yaml `names` as a list, or a dict {id: name} with ids 0..n-1."""
    scalar = (str, int, float)
    if isinstance(names, list):
        if not all(isinstance(n, scalar) for n in names):
            raise SourceError(f"{where}: every entry of 'names' must be a plain name")
        return [safe_text(str(n)) for n in names]
    if isinstance(names, dict):
        try:
            d = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError, OverflowError):
            raise SourceError(f"{where}: 'names' keys must be class ids (integers)") from None
        if sorted(d) != list(range(len(d))):
            raise SourceError(f"{where}: 'names' ids must be 0..{len(d) - 1} without gaps")
        if not all(isinstance(v, scalar) for v in d.values()):
            raise SourceError(f"{where}: every entry of 'names' must be a plain name")
        return [safe_text(str(d[i])) for i in range(len(d))]
    raise SourceError(f"{where}: 'names' must be a list or a dict, not {type(names).__name__}")


def check_dataset_yaml(d: Any, where: str) -> DatasetYaml:
    """Validate `nc`, `names`, `kpt_shape`, `path` and the split entries (SourceError, one line)."""
    if not isinstance(d, dict):
        raise SourceError(f"{where} is not a dataset yaml (expected a mapping)")
    nc = d.get("nc")
    if nc is not None and not _positive_int(nc):
        raise SourceError(f"{where}: 'nc' must be a positive integer")
    names = parse_names(d["names"], where) if d.get("names") is not None else None
    if names is not None and not names:
        raise SourceError(f"{where}: 'names' is empty")
    if names is not None and nc is not None and nc != len(names):
        raise SourceError(f"{where}: 'nc' is {nc} but 'names' has {len(names)} entries")
    from_nc = names is None and nc is not None
    if from_nc:
        names = [f"class_{i}" for i in range(nc)]
    kpt = d.get("kpt_shape")
    if kpt is not None:
        if not (isinstance(kpt, list) and len(kpt) == 2 and _positive_int(kpt[0]) and kpt[1] in (2, 3)
                and not isinstance(kpt[1], bool)):
            raise SourceError(f"{where}: 'kpt_shape' must be [number of keypoints, 2 or 3]")
        kpt = (kpt[0], kpt[1])
    if d.get("path") is not None and (not isinstance(d["path"], str) or "\x00" in d["path"]):
        raise SourceError(f"{where}: 'path' must be a folder path")
    for k in YAML_SPLITS:
        v = d.get(k)
        if v and not all(isinstance(e, str) for e in (v if isinstance(v, list) else [v])):
            raise SourceError(f"{where}: '{k}' must be a path or a list of paths")
    return DatasetYaml(names, kpt, any(k in d for k in YAML_SPLITS), from_nc)
