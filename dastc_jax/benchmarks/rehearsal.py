"""The paper's recipe rehearsed as a user runs it, at the real sizes.

  python -m dastc_jax.benchmarks.rehearsal --config=viper \
      --workdir=runs/rehearsal_viper --output=benchmarks/rehearsal.md
  python -m dastc_jax.benchmarks.rehearsal --config=viper --smoke \
      --workdir=/tmp/rehearsal

Every stage runs the command the docs give (README, docs/weights.md,
docs/optical_flow.md, docs/evaluation.md, docs/reproducing.md) in its own
process, on a world rendered at the real datasets' resolutions and layouts,
and is timed with the peak resident memory of that process (``os.wait4``; a
stage's worker processes, if any, are not added to it):

1. **render**: the synthetic world at VIPER's 1080x1920 (JPEG frames, raw
   class PNGs), Cityscapes-Seq's 1024x2048 (``leftImg8bit_sequence`` frames
   t-2..t, ``gtFine`` on frame 19; the ``leftImg8bit`` frames of the image
   domain beside them), and as the config needs SYNTHIA-Seq's 760x1280
   (16-bit labels) or GTA5's 1052x1914, with exact flows in the reference
   ``estimated_optical_flow_*`` folders; no TFDS preparation;
2. **prepare** (``python -m dastc_jax.prepare``) of the source and target;
3. video configs, **RAFT flows**: torchvision's RAFT-small with *random*
   weights (the plumbing, not the flow quality), converted (``python -m
   dastc_jax.convert``), the Cityscapes-Seq flows computed by ``python -m
   dastc_jax.flow`` into a copy of the layout without flows, and prepared;
4. the start weights. CNN configs: a **TPS stand-in**, a short source-only
   run of the config's model with the TPS head exported to the released TPS
   key layout (``.pth``), **converted** as docs/weights.md says
   (``--head_from_tps``, and the ``model.head=aspp`` copy). Transformer
   configs: an **ImageNet MiT stand-in**, the encoder at its initialisation
   in the SegFormer/mmseg key layout, **converted** as docs/reproducing.md
   says;
5. **train**: the documented command with ``train.init_from``, for a few
   steps (the rehearsal's data folder and step count added; the
   transformer's head warm-up, ``train.source_only_steps``, shortened to one
   step; for the CNN unless ``--float32``, ``model.scan_blocks=True`` and
   ``model.remat=True``, which its float32 step needs to fit a 24 GB host;
   said in the report), which ends with an evaluation at the full label
   size;
6. **eval** (``--mode=eval``) of the run's checkpoints, and **predict** on
   full-resolution frames.

It also reads the teacher's pseudo-label accuracy (``pl_accuracy``, against
the world's labels, never used by a loss) of the first DA-STC steps from the
run's TensorBoard scalars: an untrained teacher would show as chance.
Supported: ``SUPPORTED`` (the four video configs and ``gta5_vit``);
``--smoke`` renders a small world and trains the ``:smoke`` model (which
reads the VIPER layout for every video config: for the SYNTHIA-Seq configs
it prepares both).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from dastc_jax.benchmarks import provenance

_REPO = provenance.REPO
GB = 1e9
# Frame sizes (H, W) of the rendered world's layouts.
REAL_SIZES = {
    'viper': (1080, 1920),
    'cityscapes': (1024, 2048),
    'synthia_seq': (760, 1280),
    'gta5': (1052, 1914),
}
SMOKE_SIZES = {
    'viper': (72, 128),
    'cityscapes': (64, 128),
    'synthia_seq': (76, 128),
    'gta5': (70, 128),
}
# A dataset's prepare stage: (stage name, --dataset, folder in the world,
# what the report says).
_VIPER = (
    'prepare_viper',
    'viper',
    'Viper',
    'VIPER layout -> TFDS ArrayRecord (exact flows)',
)
_SYNTHIA_SEQ = (
    'prepare_synthia_seq',
    'synthia_seq',
    'SynthiaSeq/SEQS-04-DAWN',
    'SYNTHIA-Seq layout (16-bit labels) -> TFDS ArrayRecord ' '(exact flows)',
)
_GTA5 = (
    'prepare_gta5',
    'gta5',
    'GTA5',
    'GTA5 layout (PNG frames, labelIds) -> TFDS ArrayRecord',
)
_CITYSCAPES_SEQ = (
    'prepare_cityscapes_seq',
    'cityscapes_seq',
    'Cityscapes',
    'Cityscapes-Seq layout -> TFDS ArrayRecord (exact flows)',
)
_CITYSCAPES = (
    'prepare_cityscapes',
    'cityscapes',
    'Cityscapes',
    'Cityscapes layout (leftImg8bit, gtFine) -> TFDS ArrayRecord',
)


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a config of configs/ reads and starts from."""

  source: tuple[str, str, str, str]
  target: tuple[str, str, str, str]
  transformer: bool  # starts from ImageNet MiT weights, else from TPS

  @property
  def video(self) -> bool:
    return self.target is _CITYSCAPES_SEQ


SETTINGS = {
    'viper': Setting(_VIPER, _CITYSCAPES_SEQ, False),
    'synthia_seq': Setting(_SYNTHIA_SEQ, _CITYSCAPES_SEQ, False),
    'viper_vit': Setting(_VIPER, _CITYSCAPES_SEQ, True),
    'synthia_seq_vit': Setting(_SYNTHIA_SEQ, _CITYSCAPES_SEQ, True),
    'gta5_vit': Setting(_GTA5, _CITYSCAPES, True),
}
SUPPORTED = tuple(SETTINGS)


class Stage:
  """One command, run to completion and measured."""

  def __init__(self, name: str, argv: list[str], what: str):
    self.name, self.argv, self.what = name, argv, what
    self.wall_s = self.rss_gb = None
    self.returncode = None
    self.tail = ''

  def run(self, log_dir: str, env: dict[str, str]) -> 'Stage':
    log = os.path.join(log_dir, f'{self.name}.log')
    t0 = time.perf_counter()
    with open(log, 'w') as f:
      proc = subprocess.Popen(
          self.argv, stdout=f, stderr=subprocess.STDOUT, cwd=_REPO, env=env
      )
      _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    self.wall_s = time.perf_counter() - t0
    self.rss_gb = usage.ru_maxrss * 1024 / GB
    self.returncode = proc.returncode
    with open(log) as f:
      lines = [ln.rstrip() for ln in f if ln.strip()]
    self.tail = ' | '.join(lines[-3:])[-500:]
    return self

  def command(self) -> str:
    shown = list(self.argv)
    if shown[:2] == [sys.executable, '-m']:
      shown = ['python', '-m'] + shown[2:]
    elif shown[:1] == [sys.executable]:
      shown = ['python'] + shown[1:]
    return ' '.join(shown)


def render(root: str, smoke: bool, config: str = 'viper') -> dict[str, Any]:
  """The world's dataset layouts and exact flows (no TFDS preparation)."""
  from dastc_jax.data.synthetic import world  # pylint: disable=g-import-not-at-top

  sizes = SMOKE_SIZES if smoke else REAL_SIZES
  params = {
      'seed': 0,
      'source_size': list(sizes['viper']),
      'target_size': list(sizes['cityscapes']),
      'source_train_seqs': 1,
      'source_val_seqs': 1,
      'samples_per_seq': 2,
      'target_train_clips': 2,
      'target_val_clips': 2,
      'version': world.VERSION,
  }
  setting = SETTINGS[config]
  if setting.source is _SYNTHIA_SEQ:  # frames 0..4: samples t = 1..4
    params.update(
        synthia_seq_frames=4, synthia_seq_size=list(sizes['synthia_seq'])
    )
  if setting.source is _GTA5:
    params.update(gta5_size=list(sizes['gta5']))
  if os.path.isdir(root):
    shutil.rmtree(root)
  os.makedirs(root)
  world.generate(root, params, prepare_tfds=False)
  return params


def _write_raft_standin(path: str) -> None:
  """torchvision's RAFT-small with random weights, as a ``.pth`` file."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models import optical_flow  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.save(optical_flow.raft_small(weights=None).state_dict(), path)


def _export_tps(run_dir: str, config_arg: str, out: str) -> None:
  """The stand-in TPS run's last checkpoint as a released-layout file."""
  import torch  # pylint: disable=g-import-not-at-top
  from dastc_jax import convert  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import state as state_lib  # pylint: disable=g-import-not-at-top

  config = _load_config(config_arg)
  config.model.head = 'aspp'
  _, params, stats = state_lib.init_model(config, 0)
  params, stats, _ = checkpointing.load_weights(
      os.path.join(run_dir, 'checkpoints'), -1, params, stats
  )
  sd = convert.export_state_dict(params, stats, config.model)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, out)


def _export_mit(config_arg: str, out: str) -> None:
  """An ImageNet MiT file stand-in: the config's encoder at its
  initialisation, in the ``mit`` key layout (``.pth``)."""
  import torch  # pylint: disable=g-import-not-at-top
  from dastc_jax import convert  # pylint: disable=g-import-not-at-top

  sd = convert.export_mit_imagenet(_load_config(config_arg).model)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, out)


def _load_config(config_arg: str):
  import importlib  # pylint: disable=g-import-not-at-top

  path, _, variant = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return importlib.import_module(f'configs.{name}').get_config(variant or None)


def pl_accuracy(run_dir: str) -> list[tuple[int, float]]:
  """``(step, pl_accuracy)`` of a run's TensorBoard scalars."""
  from dastc_jax.runtime import workdir  # pylint: disable=g-import-not-at-top

  return workdir.read_scalars(run_dir, 'pl_accuracy')


def stages(a: argparse.Namespace, work: str) -> list[Stage]:
  """The documented commands of the rehearsal, in order."""
  py = [sys.executable, '-m']
  setting = SETTINGS[a.config]
  cfg = f'configs/{a.config}.py' + (':smoke' if a.smoke else '')
  world_dir = os.path.join(work, 'world')
  tfds = os.path.join(work, 'tfds')
  data = [f'--config.data.data_dir={tfds}']
  if a.smoke:  # the :smoke model reads the built-in world otherwise
    data.append('--config.data.synthetic.enabled=False')
  # The CNN's float32 step does not fit a 24 GB host at the real size; the
  # transformer's (scanned blocks by default) does (benchmarks/memory.md).
  fit = (
      []
      if a.float32 or setting.transformer
      else ['--config.model.scan_blocks=True', '--config.model.remat=True']
  )
  steps = [
      f'--config.train.num_steps={a.steps}',
      '--config.train.log_every=1',
      f'--config.train.checkpoint_every={a.steps}',
      '--config.eval.num_overlays=1',
  ]
  w = lambda *p: os.path.join(work, *p)
  prepared = [setting.source, setting.target]
  if a.smoke and setting.source is _SYNTHIA_SEQ:
    # Every :smoke variant trains on the VIPER layout (viper15 classes);
    # the SYNTHIA-Seq layout is still prepared, and read at full size.
    prepared.append(_VIPER)
  out = [
      Stage(
          name,
          py
          + [
              'dastc_jax.prepare',
              f'--dataset={dataset}',
              f'--manual_dir={world_dir}/{folder}',
              f'--data_dir={tfds}',
          ],
          what,
      )
      for name, dataset, folder, what in prepared
  ]
  if a.raft and setting.video:
    out += [
        Stage(
            'convert_raft',
            py
            + [
                'dastc_jax.convert',
                f'--source={w("raft_small_random.pth")}',
                f'--output={w("weights", "raft_small")}',
            ],
            'torchvision RAFT-small (random weights) -> orbax',
        ),
        Stage(
            'flow_raft',
            py
            + [
                'dastc_jax.flow',
                '--dataset=cityscapes_seq',
                f'--manual_dir={w("world_raft", "Cityscapes")}',
                f'--weights={w("weights", "raft_small")}',
            ],
            'Cityscapes-Seq flows computed with RAFT in JAX',
        ),
        Stage(
            'prepare_raft_flows',
            py
            + [
                'dastc_jax.prepare',
                '--dataset=cityscapes_seq',
                f'--manual_dir={w("world_raft", "Cityscapes")}',
                f'--data_dir={w("tfds_raft")}',
            ],
            'Cityscapes-Seq with the RAFT flows -> TFDS',
        ),
    ]
  # A function of this module, run in its own process like the commands.
  here = lambda call: [
      sys.executable,
      '-c',
      (
          f'import sys; sys.path.insert(0, {_REPO!r}); '
          f'from dastc_jax.benchmarks import rehearsal as r; r.{call}'
      ),
  ]
  if setting.transformer:
    init = w('weights', 'mit_b5')
    out += [
        Stage(
            'mit_standin',
            here(f'_export_mit({cfg!r}, {w("mit_b5.pth")!r})'),
            'stand-in for the ImageNet MiT-B5 file: the encoder at its '
            'initialisation in the SegFormer/mmseg key layout (.pth)',
        ),
        Stage(
            'convert_mit',
            py
            + [
                'dastc_jax.convert',
                f'--config={cfg}',
                f'--source={w("mit_b5.pth")}',
                f'--output={init}',
            ],
            'docs/reproducing.md: ImageNet MiT-B5 -> orbax (head '
            'initialised)',
        ),
    ]
    # The head warm-up (train.source_only_steps, 1000 as configured)
    # shortened to one step, then the DA-STC steps.
    train_steps = [
        f'--config.train.num_steps={a.steps + 1}',
        '--config.train.source_only_steps=1',
        '--config.train.log_every=1',
        f'--config.train.checkpoint_every={a.steps + 1}',
        '--config.eval.num_overlays=1',
    ]
    train_what = (
        'README: DA-STC from ImageNet MiT after a 1-step head '
        'warm-up on source labels; ends with the evaluation at '
        'the full label size'
    )
  else:
    init = w('weights', 'tps_init')
    out += [
        Stage(
            'tps_standin_train',
            py
            + [
                'dastc_jax.main',
                f'--config={cfg}',
                f'--workdir={w("tps_run")}',
                '--config.method=source_only',
                '--config.model.head=aspp',
                *data,
                *fit,
                *steps,
            ],
            'stand-in for the released TPS model: source-only steps with '
            'the TPS head',
        ),
        Stage(
            'tps_standin_export',
            here(
                f'_export_tps({w("tps_run")!r}, {cfg!r}, '
                f'{w("tps_standin.pth")!r})'
            ),
            'its weights exported to the released TPS key layout (.pth)',
        ),
        Stage(
            'convert_tps_init',
            py
            + [
                'dastc_jax.convert',
                f'--config={cfg}',
                f'--source={w("tps_standin.pth")}',
                f'--output={init}',
                '--head_from_tps',
            ],
            'docs/weights.md: DA-STC start from TPS',
        ),
        Stage(
            'convert_tps_aspp',
            py
            + [
                'dastc_jax.convert',
                f'--config={cfg}',
                '--config.model.head=aspp',
                f'--source={w("tps_standin.pth")}',
                f'--output={w("weights", "tps_viper")}',
            ],
            'docs/weights.md: the TPS model itself',
        ),
    ]
    train_steps = steps
    train_what = (
        'README: DA-STC from TPS; ends with the evaluation at the '
        'full label size'
    )
  out += [
      Stage(
          'train',
          py
          + [
              'dastc_jax.main',
              f'--config={cfg}',
              f'--workdir={w("run")}',
              f'--config.train.init_from={init}',
              *data,
              *fit,
              *train_steps,
          ],
          train_what,
      ),
      Stage(
          'eval',
          py
          + [
              'dastc_jax.main',
              f'--config={cfg}',
              f'--workdir={w("eval")}',
              '--mode=eval',
              f'--checkpoint={w("run")}',
              *data,
              *fit,
          ],
          'docs/evaluation.md: every checkpoint of the run',
      ),
      Stage(
          'predict',
          py
          + [
              'dastc_jax.main',
              f'--config={cfg}',
              '--mode=predict',
              f'--checkpoint={w("run")}',
              f'--input={w("clip")}',
              f'--output={w("prediction")}',
              *data,
              *fit,
          ],
          'docs/evaluation.md: prediction on full-resolution frames'
          + (' (OpenCV DIS flows)' if setting.video else ''),
      ),
  ]
  return out


def _prepare_inputs(a: argparse.Namespace, work: str) -> None:
  """Files the documented commands read: the RAFT stand-in, a copy of the
  Cityscapes layout without flows, a clip of full-resolution frames."""
  world_dir = os.path.join(work, 'world')
  if a.raft and SETTINGS[a.config].video:
    _write_raft_standin(os.path.join(work, 'raft_small_random.pth'))
    raft_root = os.path.join(work, 'world_raft')
    shutil.copytree(
        os.path.join(world_dir, 'Cityscapes'),
        os.path.join(raft_root, 'Cityscapes'),
    )
  frames = sorted(
      glob.glob(
          os.path.join(
              world_dir,
              'Cityscapes',
              'leftImg8bit_sequence',
              'train',
              '*',
              '*.png',
          )
      )
  )
  clip = os.path.join(work, 'clip')
  os.makedirs(clip, exist_ok=True)
  for f in frames[:3]:
    shutil.copy(f, clip)


def report(res: dict[str, Any]) -> str:
  lines = [
      f'# Rehearsal: `{res["config"]}` as a user runs it',
      '',
      f'Command: `{res["command"]}` (commit {res["commit"]}, '
      f'{res["date"]}, {res["cpus"]} CPU cores, '
      f'{res["host_gb"]:.0f} GB host memory).',
      '',
      'World: '
      + ', '.join(
          f'{name} layout {h}x{w}'
          for name, key in (
              ('VIPER', 'viper'),
              ('SYNTHIA-Seq', 'synthia_seq'),
              ('GTA5', 'gta5'),
              ('Cityscapes(-Seq)', 'cityscapes'),
          )
          if key in res['layouts']
          for h, w in [res['sizes'][key]]
      )
      + f'; {res["world"]["target_train_clips"]} train and '
      f'{res["world"]["target_val_clips"]} val target clips '
      + (
          '(frames t-2..t of each snippet; the real snippets have 30 frames, '
          'of which the loaders read these)'
          if res.get('video', True)
          else '(the image-domain loaders read their annotated frame, '
          '`leftImg8bit`)'
      )
      + (
          "; the GTA5 frames are the VIPER renders resized to GTA5's size "
          '(bilinear frames, nearest labels)'
          if 'gta5' in res['layouts']
          else ''
      )
      + f'. Rendering took {res["render_s"]:.0f} s. '
      + (
          ''
          if res['float32'] or res['transformer']
          else 'Every model command adds `--config.model.scan_blocks=True '
          '--config.model.remat=True`: at the real size the float32 CNN step '
          f'does not fit this {res["host_gb"]:.0f} GB host '
          '(benchmarks/memory.md). '
      )
      + (
          'The transformer configs run as configured (float32, scanned '
          'encoder blocks). '
          if res['transformer']
          else ''
      ),
      '',
      "Peak RSS: the largest resident size of the stage's process.",
      '',
      '| stage | what | wall s | peak RSS GB | exit | command |',
      '|---|---|---:|---:|---:|---|',
  ]
  for s in res['stages']:
    lines.append(
        f'| {s["name"]} | {s["what"]} | {s["wall_s"]:.0f} | '
        f'{s["rss_gb"]:.1f} | {s["returncode"]} | '
        f'`{s["command"]}` |'
    )
  failed = [s for s in res['stages'] if s['returncode']]
  for s in failed:
    lines += [
        '',
        f'**{s["name"]} failed** (exit {s["returncode"]}): ' f'{s["tail"]}',
    ]
  pl = res.get('pl_accuracy') or []
  lines += [
      '',
      'Teacher pseudo-label accuracy of the first DA-STC steps '
      "(frame t, against the world's labels; monitoring only): "
      + (', '.join(f'step {k}: {100 * v:.1f}%' for k, v in pl) or 'not logged')
      + '.',
  ]
  if res.get('results'):
    lines += [
        '',
        'Final evaluation of the train command (target val, full '
        f'label size): {res["results"]}.',
    ]
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='viper', choices=SUPPORTED)
  p.add_argument('--workdir', required=True)
  p.add_argument(
      '--output', default='', help='the markdown report (and a .json beside it)'
  )
  p.add_argument(
      '--smoke', action='store_true', help='small world, the :smoke model'
  )
  p.add_argument(
      '--steps',
      type=int,
      default=2,
      help='train steps of the stand-in TPS run and of DA-STC',
  )
  p.add_argument(
      '--no_raft',
      dest='raft',
      action='store_false',
      help='skip the RAFT flow stages (they need torchvision)',
  )
  p.add_argument(
      '--float32',
      action='store_true',
      help='no model.remat (a host with the memory for it)',
  )
  a = p.parse_args(argv)
  work = os.path.abspath(a.workdir)
  if os.path.isdir(work):
    shutil.rmtree(work)
  os.makedirs(os.path.join(work, 'logs'))
  t0 = time.perf_counter()
  params = render(os.path.join(work, 'world'), a.smoke, a.config)
  render_s = time.perf_counter() - t0
  _prepare_inputs(a, work)
  env = dict(os.environ)
  done = []
  for st in stages(a, work):
    print(f'[rehearsal] {st.name}: {st.command()}', flush=True)
    st.run(os.path.join(work, 'logs'), env)
    print(
        f'[rehearsal] {st.name}: exit {st.returncode}, {st.wall_s:.0f} s, '
        f'{st.rss_gb:.1f} GB',
        flush=True,
    )
    done.append(st)
    if st.returncode:
      break
  results = ''
  found = sorted(
      glob.glob(os.path.join(work, 'run', 'eval', 'step_*', 'results.json')),
      key=lambda f: int(f.split('step_')[-1].split(os.sep)[0]),
  )
  if found:
    with open(found[-1]) as f:
      r = json.load(f)
    results = (
        ', '.join(
            f'{k} mIoU {v["miou"]:.1f} over {v["num_images"]} images'
            for k, v in r.get('splits', {}).items()
        )
        or json.dumps(r)[:200]
    )
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB
  commit = provenance.commit()

  res = {
      'config': f'configs/{a.config}.py' + (':smoke' if a.smoke else ''),
      'command': 'python -m dastc_jax.benchmarks.rehearsal ' + ' '.join(argv),
      'commit': commit,
      'date': time.strftime('%Y-%m-%d'),
      'cpus': os.cpu_count(),
      'host_gb': host,
      'float32': a.float32,
      'sizes': SMOKE_SIZES if a.smoke else REAL_SIZES,
      'world': params,
      'layouts': ['viper', 'cityscapes']
      + [k for k in ('synthia_seq', 'gta5') if f'{k}_size' in params],
      'transformer': SETTINGS[a.config].transformer,
      'video': SETTINGS[a.config].video,
      'render_s': render_s,
      'results': results,
      'pl_accuracy': (
          pl_accuracy(os.path.join(work, 'run'))
          if os.path.isdir(os.path.join(work, 'run'))
          else []
      ),
      'stages': [
          {
              'name': s.name,
              'what': s.what,
              'wall_s': s.wall_s,
              'rss_gb': s.rss_gb,
              'returncode': s.returncode,
              'command': s.command(),
              'tail': s.tail,
          }
          for s in done
      ],
  }
  text = report(res)
  print(text)
  if a.output:
    with open(a.output, 'w') as f:
      f.write(text)
    with open(os.path.splitext(a.output)[0] + '.json', 'w') as f:
      json.dump(res, f, indent=1)
  if any(s.returncode for s in done):
    raise SystemExit(1)


if __name__ == '__main__':
  main(sys.argv[1:])
