"""Packed datasets on storage: local folders and URLs through one interface (fsspec underneath).

- `fs`: URLs, filesystems, redaction of secrets, transient-error retries (tenacity).
- `files`: one file at a time: streamed reads, checksummed downloads, whole-or-nothing uploads.
- `location`: `DatasetLocation`, a packed dataset at a folder or a URL (manifest, labels, files).
- `transfer`, `push`, `pull`: copying whole datasets to and from storage, manifest last.

Submodules import only their siblings' modules (never this package's namespace): no cycles.
"""
