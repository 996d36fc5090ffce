"""Paths that may live on cloud storage (``gs://...``), through etils.epath.

Workdirs, data dirs, checkpoint roots and evaluation outputs go through
``resolve``: a local path becomes absolute (``~`` expanded), a URL-style path
(``gs://``, ``s3://``, ...) is passed on unchanged. ``write_atomic`` is the
one way files that a crash must not leave half-written are written;
``staging_dir`` and ``publish_dir`` do the same for whole output folders,
and ``local_copy`` serves URL inputs to readers that need a local file. Any
module may import this one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator
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
  try:
    with tmp.open(mode) as f:
      f.write(data)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file
    raise


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
  """A local path with the contents of ``path`` while the block runs.

  Local paths are yielded as they are (absolute). A URL file, or the files
  directly inside a URL folder, are first copied into a temporary local
  folder (for readers that need a real file: OpenCV, torch), which is
  removed afterwards.
  """
  if not is_url(path):
    yield os.path.abspath(os.path.expanduser(os.fspath(path)))
    return
  src = epath.Path(path)
  tmp = tempfile.mkdtemp(prefix='dastc_jax-')
  try:
    if src.is_dir():
      for f in src.iterdir():
        if not f.is_dir():
          (pathlib.Path(tmp) / f.name).write_bytes(f.read_bytes())
      yield tmp
    else:
      local = pathlib.Path(tmp) / src.name
      local.write_bytes(src.read_bytes())
      yield str(local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def staging_dir(output: PathLike) -> str:
  """A fresh local folder to build ``output`` in before ``publish_dir``:
  ``OUTPUT.partial`` beside a local output (so the final rename is atomic),
  a temporary folder for a URL."""
  if is_url(output):
    return tempfile.mkdtemp(prefix='dastc_jax-')
  tmp = os.fspath(output) + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def publish_dir(staged: str, output: PathLike, last: str = '') -> None:
  """Puts the finished local folder ``staged`` in place of ``output``.

  Local: the old ``output`` (if any) is removed and ``staged`` renamed into
  place, so readers see no half-written folder. URL (object stores have no
  folder rename): the old folder is removed and every file uploaded, the
  file named ``last`` after all the others, so its presence marks a
  complete folder; ``staged`` is removed.
  """
  if not is_url(output):
    out = os.fspath(output)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staged, out)
    return
  out = epath.Path(output)
  if out.exists():
    out.rmtree()
  files = sorted(
      os.path.relpath(os.path.join(d, f), staged)
      for d, _, names in os.walk(staged)
      for f in names
  )
  files.sort(key=lambda rel: rel == last)  # stable: `last` goes last
  for rel in files:
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(pathlib.Path(staged, rel).read_bytes())
  shutil.rmtree(staged, ignore_errors=True)
