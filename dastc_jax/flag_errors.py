"""Flag errors of the commands as one line (exit status 2), no traceback.

``app.run(main, flags_parser=flag_errors.parse)``: a missing ``--config``
file, an unknown config variant, a misspelt or unparsable override, an
unknown flag or a value outside a flag's choices end with ``error: ...`` on
stderr, as ``errors.UserError`` does for everything after parsing.
"""

from __future__ import annotations

import glob
import os
import sys

from absl import flags


def _config_path(argv: list[str]) -> str | None:
  """The file of ``--config=PATH[:variant]`` in ``argv`` (None: absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return value.split(':', 1)[0]
  return None


def _chain(e: BaseException) -> list[BaseException]:
  """``e`` and the exceptions it was raised while handling."""
  out = [e]
  while out[-1].__context__ is not None and len(out) < 20:
    out.append(out[-1].__context__)
  return out


def _flag_error_line(e: Exception, argv: list[str]) -> str:
  """One line for a bad ``--config`` variant or override (or any other
  flag error: its first line)."""
  chain = _chain(e)
  missing = next((x for x in chain if isinstance(x, KeyError)), None)
  if missing is not None and missing.args:
    lines = str(missing.args[0]).strip().splitlines()
    key = lines[0].strip('\'"')
    flag = next(
        (
            a.split('=')[0]
            for a in argv
            if a.startswith('--config.')
            and key in a.split('=')[0].split('.')[1:]
        ),
        None,
    )
    if flag is not None:
      hint = ' '.join(lines[1:])
      return (
          f'{flag}: the config has no key {key!r}.'
          + (f' {hint}' if hint else '')
          + ' (configs/common.py declares every key)'
      )
  variant = next(
      (
          x
          for x in reversed(chain)
          if isinstance(x, ValueError)
          and not isinstance(x, flags.Error)
          and 'variant' in str(x)
      ),
      None,
  )
  if variant is not None:
    return f'--config: {variant}'
  text = str(e).strip()
  first = text.splitlines()[0] if text else repr(e)
  return first[len('flag ') :] if first.startswith('flag --') else first


def parse(argv: list[str]) -> list[str]:
  """absl's flag parsing; a missing config file, an unknown variant or a
  misspelt override ends with one line on stderr and exit status 2."""
  path = _config_path(argv[1:])
  if path is not None and not os.path.exists(path):
    near = sorted(glob.glob(os.path.join(os.path.dirname(path) or '.', '*.py')))
    near = [os.path.basename(p) for p in near if not p.endswith('__init__.py')]
    print(
        f'error: --config: no such file {path!r}'
        + (
            f'; {os.path.dirname(path) or "."} has {", ".join(near)}'
            if near
            else ''
        )
        + '.',
        file=sys.stderr,
    )
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    print(f'error: {_flag_error_line(e, argv)}', file=sys.stderr)
    sys.exit(2)
