"""Segment a video or a folder of frames: coloured overlays, PNG + MP4/GIF.

  python -m dastc_jax.main --config=configs/viper.py --mode=predict \
      --checkpoint=runs/viper --input=drive.mp4 --output=out/drive

Each frame t is resized to the evaluation size of the target domain
(``config.data.target_val.image_size``) for the model and segmented with
frame t-1 as the key frame and the flow t->t-1 (the first frame is its
own key frame, with zero flow). Flows are read from ``--flows``
(``<frame name>.npy`` or Middlebury ``.flo``, t->t-1, on any grid: they
are resized with the usual magnitude rule), computed with RAFT when
``--flow_weights`` names RAFT
weights (``dastc_jax/flow/``), or else with OpenCV's DIS optical flow, a
classical method: the reference used FlowNet2, whose flows are smoother, so
DIS flows give somewhat different fusions. The image-domain models
(``deeplabv2``) use no flow.

Output, written to ``OUTPUT.partial`` and renamed to ``OUTPUT`` only when
every frame is done (a failure leaves no folder that looks complete; on an
object store, ``gs://...``, the folder is uploaded when done, with
``legend.json`` last):

``--input=synthetic`` segments the built-in world's validation frames
(two per clip, clip after clip), for a first look at a demo checkpoint.

  OUTPUT/overlays/{name}.png   the input frame blended with the class colours
  OUTPUT/labels/{name}.png     predicted class ids, uint8: 0..C-1 in the
                               order of the config's class set (legend.json
                               names them; 255 is never written)
  OUTPUT/prediction.mp4 or .gif the overlays as an animation
  OUTPUT/legend.json           class names (in id order) and colours

Both images have the input frame's own size: the scores are upsampled
(bilinear, corners aligned, as in evaluation) from the model's size to the
frame's before the argmax. ``{name}`` is the frame file's name without its
extension (``{index:06d}`` for a video).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from typing import Iterator

from absl import logging
import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dastc_jax import errors
from dastc_jax import paths
from dastc_jax.data import io as io_lib
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import transforms
from dastc_jax.evaluation import forward
from dastc_jax.evaluation import visualize
from dastc_jax.flow import dis
from dastc_jax import models
from dastc_jax.runtime import checkpointing
from dastc_jax.runtime import state as state_lib
from dastc_jax.runtime import validation

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp')


class PredictError(errors.UserError, ValueError):
  """An input video, frame or flow cannot be used."""


# -------------------------------------------------------------------- input
def read_frames(
    path: str, max_frames: int = 0
) -> tuple[Iterator[tuple[str, np.ndarray]], float]:
  """``(name, RGB uint8 [H, W, 3])`` of a video file or a frame folder.

  Returns:
    The frame iterator and the video's frame rate (0 for folders).

  Raises:
    PredictError: naming the file that cannot be read.
  """
  if os.path.isdir(path):
    files = sorted(
        f
        for f in glob.glob(os.path.join(path, '*'))
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
      raise PredictError(
          f'{path} has no frames ({", ".join(IMAGE_EXTENSIONS)}' ' files).'
      )
    files = files[:max_frames] if max_frames else files

    def from_folder():
      for f in files:
        try:
          yield os.path.splitext(os.path.basename(f))[0], io_lib.read_rgb(f)
        except io_lib.DataError as e:
          raise PredictError(str(e)) from e

    return from_folder(), 0.0
  if not os.path.isfile(path):
    raise PredictError(f'Input {path} does not exist.')
  cap = cv2.VideoCapture(path)
  ok, first = cap.read() if cap.isOpened() else (False, None)
  if not ok:
    cap.release()
    raise PredictError(
        f'Cannot read a video frame from {path}: not a video '
        'OpenCV/FFmpeg can decode (or empty).'
    )
  fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)

  def from_video():
    frame, i = first, 0
    try:
      while frame is not None:
        yield f'{i:06d}', cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        i += 1
        if max_frames and i >= max_frames:
          break
        ok, frame = cap.read()
        if not ok:
          frame = None
    finally:
      cap.release()

  return from_video(), fps


def read_flow_file(path: str) -> np.ndarray:
  """A flow ``[H, W, 2]`` from ``.npy`` or Middlebury ``.flo``."""
  try:
    if path.endswith('.flo'):
      with open(path, 'rb') as f:
        if np.fromfile(f, np.float32, 1).tolist() != [202021.25]:
          raise PredictError(f'{path} is not a .flo file (bad magic number).')
        w, h = np.fromfile(f, np.int32, 2)
        data = np.fromfile(f, np.float32, 2 * w * h)
      if data.size != 2 * w * h:
        raise PredictError(f'{path} is truncated: expected {h}x{w}x2 floats.')
      return data.reshape(h, w, 2)
    flow = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    if isinstance(e, PredictError):
      raise
    raise PredictError(f'Cannot read flow {path}: {e}') from e
  if flow.ndim != 3 or flow.shape[-1] != 2:
    raise PredictError(
        f'Flow {path} has shape {flow.shape}; expected '
        '[H, W, 2] (dx, dy) from frame t to t-1.'
    )
  return flow.astype(np.float32)


DisFlow = dis.DisFlow


# -------------------------------------------------------------------- model
def load_weights(
    config: ml_collections.ConfigDict, checkpoint: str, workdir: str
):
  """``(params, batch_stats)`` of a checkpoint (latest of a folder)."""
  root, step = checkpointing.resolve(workdir, checkpoint)
  params_like, stats_like = jax.eval_shape(
      lambda: state_lib.init_model(config, 0)[1:]
  )
  params, stats, step = checkpointing.load_weights(
      root, step, params_like, stats_like
  )
  logging.info('Predicting with %s step %d.', root, step)
  return params, stats


def make_predict_fn(config: ml_collections.ConfigDict):
  """Jitted ``(params, stats, frames [1, T, H, W, 3] uint8, flow, out_hw)
  -> ids [1, h, w]`` (fused logits upsampled with align corners)."""
  graphdef = state_lib.model_graphdef(config)
  dtype = models.compute_dtype(config.model.dtype)
  slide = forward.slide_setting(config)

  def predict(params, stats, frames, flow, out_hw):
    logits = forward.predict_logits(
        graphdef, params, stats, frames, flow, out_hw, dtype, slide
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return jax.jit(predict, static_argnums=(4,))


# --------------------------------------------------------------------- run
def _write_animation(
    frames_dir: str, out_path: str, fmt: str, fps: float
) -> None:
  files = sorted(glob.glob(os.path.join(frames_dir, '*.png')))
  if fmt == 'gif':
    images = [Image.open(f) for f in files]
    images[0].save(
        out_path,
        save_all=True,
        append_images=images[1:],
        duration=int(round(1000 / fps)),
        loop=0,
    )
    return
  first = cv2.imread(files[0])
  h, w = first.shape[:2]
  writer = cv2.VideoWriter(
      out_path, cv2.VideoWriter_fourcc(*'mp4v'), fps, (w, h)
  )
  if not writer.isOpened():
    raise PredictError(
        f'OpenCV cannot write {out_path} (mp4v); use ' '--video_format=gif.'
    )
  try:
    for f in files:
      writer.write(cv2.imread(f))
  finally:
    writer.release()


# ``--input=synthetic``: the built-in world's target validation frames.
SYNTHETIC_INPUT = 'synthetic'


def synthetic_frames(config: ml_collections.ConfigDict) -> str:
  """The folder of the synthetic world's Cityscapes-layout validation
  frames (two consecutive frames of each clip, clip after clip), for a
  config that trains on the world (it must have been generated: a training
  run does that)."""
  from dastc_jax.data.synthetic import world as synthetic  # pylint: disable=g-import-not-at-top

  if not config.data.synthetic.enabled:
    raise PredictError(
        '--input=synthetic needs a config that trains on the synthetic world '
        '(config.data.synthetic.enabled=True); give a video or a folder of '
        'frames instead.'
    )
  try:
    root = synthetic.existing_world(config.data.synthetic)
  except FileNotFoundError as e:
    raise PredictError(str(e)) from e
  return os.path.join(
      root, 'Cityscapes', 'leftImg8bit_sequence', 'val', 'synthville'
  )


def run(
    config: ml_collections.ConfigDict,
    *,
    checkpoint: str,
    workdir: str,
    input_path: str,
    output: str,
    flows: str | None = None,
    flow_weights: str | None = None,
    video_format: str = 'mp4',
    fps: float = 0.0,
    max_frames: int = 0,
    overwrite: bool = True,
) -> dict[str, str | int]:
  """Segments every frame of ``input_path`` into ``output`` (module doc).

  Input, flows and output may be ``gs://...`` paths: inputs are read through
  a local copy, the output is built locally and then published
  (``paths.publish_dir``; on an object store ``legend.json`` is uploaded
  last).

  Returns:
    ``{'output', 'frames', 'animation'}``.
  """
  validation.check_config(config)
  if input_path == SYNTHETIC_INPUT:
    input_path = synthetic_frames(config)
  output = os.fspath(paths.resolve(output))
  if not overwrite and paths.resolve(output).exists():
    raise PredictError(f'{output} exists.')
  with contextlib.ExitStack() as stack:
    local_input = stack.enter_context(paths.local_copy(input_path))
    local_flows = (
        stack.enter_context(paths.local_copy(flows)) if flows else None
    )
    tmp = paths.staging_dir(output)
    try:
      count, animation, estimator = _segment(
          config,
          checkpoint=checkpoint,
          workdir=workdir,
          input_path=local_input,
          flows=local_flows,
          flow_weights=flow_weights,
          tmp=tmp,
          video_format=video_format,
          fps=fps,
          max_frames=max_frames,
      )
      cs = labels_lib.get_class_set(config.data.class_set)
      two_frames = models.clip_length(config.model) == 2
      legend = {
          'class_set': cs.name,
          'classes': list(cs.classes),
          'colors': [cs.palette()[i].tolist() for i in range(len(cs.classes))],
          'input': os.fspath(paths.resolve(input_path)),
          'frames': count,
          'flows': (flows or estimator)
          if two_frames
          else 'none (single-frame model)',
      }
      with open(os.path.join(tmp, 'legend.json'), 'w') as f:
        json.dump(legend, f, indent=2)
      paths.publish_dir(tmp, output, last='legend.json')
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  animation = animation.replace(tmp, output) if animation else ''
  print(
      f'Wrote {count} overlays to {output}/overlays'
      + (f' and {animation}' if animation else '')
      + '.',
      flush=True,
  )
  return {'output': output, 'frames': count, 'animation': animation}


def _segment(
    config: ml_collections.ConfigDict,
    *,
    checkpoint: str,
    workdir: str,
    input_path: str,
    flows: str | None,
    flow_weights: str | None,
    tmp: str,
    video_format: str,
    fps: float,
    max_frames: int,
) -> tuple[int, str]:
  """Writes the overlays, label maps and animation of every frame into the
  local folder ``tmp``; returns ``(frames, animation path or '', the flow
  estimator's name)``."""
  palette = labels_lib.get_class_set(config.data.class_set).palette()
  size = tuple(config.data.target_val.image_size or ())
  two_frames = models.clip_length(config.model) == 2
  frames, video_fps = read_frames(input_path, max_frames)
  params, stats = load_weights(config, checkpoint, workdir)
  predict = make_predict_fn(config)
  estimate_flow, estimator = None, 'none'
  if two_frames and not flows:
    if flow_weights:
      from dastc_jax.flow import estimate  # pylint: disable=g-import-not-at-top

      raft = estimate.RaftEstimator(flow_weights)
      estimate_flow = raft
      estimator = f'{raft.name} ({raft.meta["source"]}, computed)'
    else:
      estimate_flow = DisFlow()
      estimator = f'{estimate_flow.name} (computed)'
  os.makedirs(os.path.join(tmp, 'overlays'))
  os.makedirs(os.path.join(tmp, 'labels'))
  prev, count, seen = None, 0, set()
  for name, rgb in frames:
    if name in seen:
      raise PredictError(
          f'Two input frames are named {name!r} (with different '
          f'extensions) in {input_path}; their outputs would collide.'
      )
    seen.add(name)
    hw = size or rgb.shape[:2]
    cur = transforms.resize_rgb(rgb, hw) if rgb.shape[:2] != hw else rgb
    batch, flow = cur[None, None], None
    if two_frames:
      key = cur if prev is None else prev
      if prev is None:
        flow = np.zeros(hw + (2,), np.float32)
      elif flows:
        path = next(
            (
                os.path.join(flows, name + ext)
                for ext in ('.npy', '.flo')
                if os.path.isfile(os.path.join(flows, name + ext))
            ),
            None,
        )
        if path is None:
          raise PredictError(
              f'No flow for frame {name!r} in {flows} '
              f'(expected {name}.npy or {name}.flo).'
          )
        flow = transforms.resize_flow_np(
            read_flow_file(path), hw, config.model.per_axis_flow_scale
        )
      else:
        flow = estimate_flow(cur, key)
      batch = np.stack([cur, key])[None]
      flow = flow[None]
    # The scores at the input frame's own size, not the model's.
    ids = np.asarray(predict(params, stats, batch, flow, rgb.shape[:2]))[0]
    frame = f'{name}.png'
    visualize.save_png(os.path.join(tmp, 'labels', frame), ids)
    blend = (rgb * 0.5 + visualize.colorize(ids, palette) * 0.5).astype(
        np.uint8
    )
    visualize.save_png(os.path.join(tmp, 'overlays', frame), blend)
    prev, count = cur, count + 1
  if not count:
    raise PredictError(f'{input_path} yielded no frames.')
  animation = ''
  if video_format != 'none':
    animation = os.path.join(tmp, f'prediction.{video_format}')
    _write_animation(
        os.path.join(tmp, 'overlays'),
        animation,
        video_format,
        fps or video_fps or 10.0,
    )
  return count, animation, estimator
