"""Prediction on frames and videos: overlays, animations, flows, errors; and
the README's convert -> eval -> predict commands as subprocesses."""

import glob
import os
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
import pytest
import torch

from tests import torch_accel
from dastc_jax.evaluation import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _frames(n=4, h=60, w=90, shift=3):
  """A textured scene moving ``shift`` pixels right per frame."""
  rng = np.random.default_rng(0)
  base = cv2.GaussianBlur(
      rng.integers(0, 256, (h, w + n * shift, 3), dtype=np.uint8), (5, 5), 0
  )
  return [base[:, (n - i) * shift : (n - i) * shift + w] for i in range(n)]


def test_dis_flow_points_from_t_to_t_minus_1():
  f = _frames(2, 80, 120, shift=3)  # content moves +3 px in x from t-1 to t
  flow = predict.DisFlow()(f[1], f[0])
  inner = flow[10:-10, 10:-10]
  assert abs(np.median(inner[..., 0]) + 3) < 0.5  # t(x) = t-1(x - 3)
  assert abs(np.median(inner[..., 1])) < 0.5


@pytest.mark.parametrize('fmt', ['gif', 'mp4'])
def test_predict_a_folder_of_frames(smoke_config, weights, tmp_path, fmt):
  c = smoke_config
  frames_dir = tmp_path / 'frames'
  frames_dir.mkdir()
  for i, f in enumerate(_frames(h=61, w=91)):  # an odd size
    Image.fromarray(f).save(frames_dir / f'f{i:03d}.png')
  out = str(tmp_path / 'out')
  res = predict.run(
      c,
      checkpoint=weights,
      workdir='.',
      input_path=str(frames_dir),
      output=out,
      video_format=fmt,
  )
  assert res['frames'] == 4
  overlays = sorted(glob.glob(os.path.join(out, 'overlays', '*.png')))
  labels = sorted(glob.glob(os.path.join(out, 'labels', '*.png')))
  assert len(overlays) == len(labels) == 4
  # The input's names and its own size (61x91), not the model's (32x64).
  assert [os.path.basename(p) for p in labels] == [
      f'f{i:03d}.png' for i in range(4)
  ]
  assert tuple(c.data.target_val.image_size) != (61, 91)
  assert np.asarray(Image.open(overlays[0])).shape == (61, 91, 3)
  ids = np.asarray(Image.open(labels[0]))
  assert ids.shape == (61, 91) and ids.max() < c.model.num_classes
  anim = os.path.join(out, f'prediction.{fmt}')
  if fmt == 'gif':
    assert Image.open(anim).n_frames == 4
  else:
    cap = cv2.VideoCapture(anim)
    n = 0
    while cap.read()[0]:
      n += 1
    assert n == 4
  assert not os.path.exists(out + '.partial')


def test_predict_with_raft_flows(smoke_config, weights, tmp_path):
  """--flow_weights: the flows come from RAFT (random torchvision weights
  here: the plumbing and the record, not the flow quality)."""
  from torchvision.models import optical_flow as tv_flow  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  raft_file = str(tmp_path / 'raft_small.pth')
  torch.save(tv_flow.raft_small(weights=None).state_dict(), raft_file)
  frames_dir = tmp_path / 'frames'
  frames_dir.mkdir()
  for i, f in enumerate(_frames(3)):
    Image.fromarray(f).save(frames_dir / f'f{i:03d}.png')
  out = str(tmp_path / 'out')
  res = predict.run(
      smoke_config,
      checkpoint=weights,
      workdir='.',
      input_path=str(frames_dir),
      output=out,
      flow_weights=raft_file,
      video_format='none',
  )
  assert res['frames'] == 3
  legend = json.load(open(os.path.join(out, 'legend.json')))
  assert legend['flows'].startswith('raft:raft_small (') and (
      raft_file in legend['flows']
  )


def test_predict_a_video_with_given_flows_and_errors(
    smoke_config, weights, tmp_path
):
  c = smoke_config
  video = str(tmp_path / 'in.mp4')
  frames = _frames(5)
  wr = cv2.VideoWriter(
      video,
      cv2.VideoWriter_fourcc(*'mp4v'),
      5.0,
      (frames[0].shape[1], frames[0].shape[0]),
  )
  for f in frames:
    wr.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  wr.release()
  flows = tmp_path / 'flows'
  flows.mkdir()
  for i in range(1, 3):
    np.save(flows / f'{i:06d}.npy', np.full((60, 90, 2), -1.0, np.float32))
  out = str(tmp_path / 'out')
  res = predict.run(
      c,
      checkpoint=weights,
      workdir='.',
      input_path=video,
      output=out,
      flows=str(flows),
      max_frames=3,
      video_format='none',
  )
  assert res['frames'] == 3 and not res['animation']
  # A flow missing for a frame: named, and no output that looks complete.
  out2 = str(tmp_path / 'out2')
  with pytest.raises(predict.PredictError, match="frame '000003'"):
    predict.run(
        c,
        checkpoint=weights,
        workdir='.',
        input_path=video,
        output=out2,
        flows=str(flows),
    )
  assert not os.path.exists(out2) and not os.path.exists(out2 + '.partial')
  # A file that is not a video.
  fake = tmp_path / 'notes.mp4'
  fake.write_text('not a video')
  with pytest.raises(predict.PredictError, match='notes.mp4'):
    predict.run(
        c, checkpoint=weights, workdir='.', input_path=str(fake), output=out2
    )
  assert not os.path.exists(out2)
  # A corrupt frame in a folder is named.
  bad = tmp_path / 'bad'
  bad.mkdir()
  Image.fromarray(frames[0]).save(bad / 'a.png')
  (bad / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  with pytest.raises(predict.PredictError, match='b.png'):
    predict.run(
        c, checkpoint=weights, workdir='.', input_path=str(bad), output=out2
    )
  assert not os.path.exists(out2)


def test_readme_commands_convert_eval_predict(
    smoke_config, tiny_world, tmp_path
):
  del tiny_world  # the eval command reads the world; it does not generate it
  c = smoke_config
  m = c.model
  torch.manual_seed(0)
  tm = torch_accel.AccelDeepLab(
      m.num_classes,
      tuple(m.layers),
      m.width,
      m.head_features,
      tuple(m.aspp_dilations),
  )
  src = str(tmp_path / 'released.pth')
  torch.save(tm.state_dict(), src)
  cfg = [
      '--config=configs/synthetic.py:smoke',
      f'--config.data.synthetic.cache_dir={c.data.synthetic.cache_dir}',
  ]
  # Fast compiles, as everywhere in the suite (the commands are unchanged).
  env = {
      **os.environ,
      'PYTHONPATH': REPO,
      'JAX_PLATFORMS': 'cpu',
      'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',
  }
  env.pop('XLA_FLAGS', None)

  def run(module, *args):
    proc = subprocess.run(
        [sys.executable, '-m', module, *cfg, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  weights = str(tmp_path / 'weights')
  out = run('dastc_jax.convert', f'--source={src}', f'--output={weights}')
  assert 'tensors converted (accel layout)' in out
  out = run(
      'dastc_jax.main',
      '--mode=eval',
      f'--workdir={tmp_path}/ev',
      f'--checkpoint={weights}',
      '--config.eval.num_overlays=0',
  )
  assert 'last checkpoint** (step 0)' in out
  frames_dir = tmp_path / 'frames'
  frames_dir.mkdir()
  for i, f in enumerate(_frames(3)):
    Image.fromarray(f).save(frames_dir / f'{i}.jpg')
  out = run(
      'dastc_jax.main',
      '--mode=predict',
      f'--checkpoint={weights}',
      f'--input={frames_dir}',
      f'--output={tmp_path}/pred',
      '--video_format=gif',
  )
  assert 'Wrote 3 overlays' in out
  assert os.path.isfile(tmp_path / 'pred' / 'prediction.gif')


def test_predict_the_synthetic_worlds_frames(
    tiny_world, smoke_config, weights, tmp_path
):
  """``--input=synthetic`` (the README's first prediction): the world's
  Cityscapes-layout validation frames, under their own names."""
  del tiny_world  # generated (training does it; prediction does not)
  out = str(tmp_path / 'out')
  res = predict.run(
      smoke_config,
      checkpoint=weights,
      workdir='.',
      input_path='synthetic',
      output=out,
      video_format='none',
      max_frames=3,
  )
  assert res['frames'] == 3
  labels = sorted(os.listdir(os.path.join(out, 'labels')))
  assert len(labels) == 3 and all(
      n.startswith('synthville_') and n.endswith('_leftImg8bit.png')
      for n in labels
  )
  c = smoke_config.copy_and_resolve_references()
  c.data.synthetic.enabled = False
  c.data.data_dir = str(tmp_path)
  with pytest.raises(predict.PredictError, match='synthetic world'):
    predict.run(
        c, checkpoint=weights, workdir='.', input_path='synthetic', output=out
    )
