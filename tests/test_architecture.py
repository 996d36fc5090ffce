"""The import rules of docs/architecture.md, checked on every module."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'dastc_jax'
ALLOWED = {
    'ops': set(),
    'models': {'ops'},
    'method': {'models', 'ops'},
    'data': set(),
    'runtime': {'method', 'models', 'ops', 'data'},
    'evaluation': {'runtime', 'method', 'models', 'ops', 'data', 'flow'},
    'flow': {'ops', 'data'},
}


def _package_imports(path: pathlib.Path) -> set[str]:
  """Top-level dastc_jax folders (or modules) that ``path`` imports."""
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'dastc_jax':
        names = [a.name for a in node.names]
      elif node.module.startswith('dastc_jax.'):
        names = [node.module.split('.')[1]]
    elif isinstance(node, ast.Import):
      names = [
          a.name.split('.')[1]
          for a in node.names
          if a.name.startswith('dastc_jax.')
      ]
    out.update(names)
  return out


def test_every_layer_imports_only_what_it_may():
  violations = []
  for layer, allowed in ALLOWED.items():
    for path in sorted((ROOT / layer).rglob('*.py')):
      if path.name == '__main__.py':
        continue  # a command (python -m dastc_jax.LAYER): may import anything
      bad = (
          _package_imports(path)
          - allowed
          - {layer, 'errors', 'paths', 'weight_files'}
      )
      if bad:
        violations.append(f'{path.relative_to(ROOT)} imports {sorted(bad)}')
  assert not violations, '\n'.join(violations)


def test_the_checker_sees_imports():
  assert _package_imports(ROOT / 'method' / 'dastc_step.py') >= {
      'method',
      'models',
      'ops',
  }
  assert 'runtime' in _package_imports(ROOT / 'runtime' / 'steps.py')


def test_training_imports_need_no_test_only_dependency():
  """The commands import without torch, torchvision, transformers, pytest
  or cityscapesscripts (requirements-dev.txt only): a fresh interpreter in
  which importing any of them fails."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = """
import importlib, sys
BLOCKED = ('torch', 'torchvision', 'transformers', 'pytest',
           'cityscapesscripts')
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'test-only dependency imported: {name}')
sys.meta_path.insert(0, Block())
for m in ('dastc_jax.main', 'dastc_jax.train', 'dastc_jax.prepare',
          'dastc_jax.convert', 'dastc_jax.flow.generate',
          'dastc_jax.evaluation.eval_job', 'dastc_jax.evaluation.predict',
          'configs.viper', 'configs.viper_vit', 'configs.gta5_vit'):
  importlib.import_module(m)
print('OK')
"""
  proc = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      cwd=str(ROOT.parent),
      check=False,
  )
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-2000:]
