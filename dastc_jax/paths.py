"""Paths that may live on cloud storage (``gs://...``), through etils.epath.

Workdirs, data dirs, checkpoint roots and evaluation outputs go through
``resolve``: a local path becomes absolute (``~`` expanded), a URL-style path
(``gs://``, ``s3://``, ...) is passed on unchanged. ``write_atomic`` is the
one way files that a crash must not leave half-written are written. Any
module may import this one.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """``gs://b/x`` and friends (a scheme before ``://``)."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """An ``epath.Path``: absolute for local paths, unchanged for URLs."""
  p = os.fspath(path)
  if is_url(p):
    return epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(p)))


def write_atomic(path: PathLike, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` so that readers see the old file or the
  whole new one: a temporary sibling, then a rename (object stores write
  whole objects, so there the file is written directly)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  if is_url(path):
    with path.open(mode) as f:
      f.write(data)
    return
  tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp'
  with tmp.open(mode) as f:
    f.write(data)
  tmp.replace(path)
