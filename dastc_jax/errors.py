"""Errors a user can fix (bad input, bad config), shown without a traceback.

Every command catches ``UserError`` at the top and prints its message on one
line (exit status 2); anything else is a programming error and keeps its
traceback. Any module may import this one.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar('T')


class UserError(Exception):
  """Bad input or configuration; the message says what and where."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key."""


def report_user_errors(fn: Callable[..., T]) -> Callable[..., T]:
  """Wraps a command's ``main``: a ``UserError`` prints ``error: ...`` to
  stderr and exits with status 2."""

  def run(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  return run
