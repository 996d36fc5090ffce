"""File decoding with errors that name the file and say what was expected."""

from __future__ import annotations

import io as io_lib
import os

import numpy as np
from PIL import Image
import scipy.ndimage

from dastc_jax import errors

FLOW_HELP = (
    'Flows are stored as np.save(name, np.int16(10 * F)) with F of shape '
    "[H, W, 2] on frame t's grid pointing into the earlier frame (channel 0 "
    '= dx). Compute them with `python -m dastc_jax.flow --dataset=... '
    '--manual_dir=... --weights=RAFT_WEIGHTS` (or `prepare '
    '--compute_flows=RAFT_WEIGHTS`), or use the released FlowNet2 flows; '
    'the built-in synthetic world writes exact flows in this format.'
)


class DataError(errors.UserError, ValueError):
  """A dataset file is missing, unreadable or not what the layout requires."""


def _open(path: str, what: str) -> Image.Image:
  if not os.path.exists(path):
    raise DataError(f'Missing {what}: {path}')
  try:
    img = Image.open(path)
    img.load()
  except Exception as e:  # PIL raises many types on corrupt files.
    raise DataError(
        f'Cannot decode {what} {path}: {e}. Expected a complete '
        'PNG or JPEG file.'
    ) from e
  return img


def image_size(path: str) -> tuple[int, int]:
  """``(H, W)`` of an image file from its header (no decode)."""
  if not os.path.exists(path):
    raise DataError(f'Missing image: {path}')
  try:
    with Image.open(path) as img:
      w, h = img.size
  except Exception as e:
    raise DataError(f'Cannot read image header of {path}: {e}.') from e
  return h, w


def read_rgb(path: str) -> np.ndarray:
  """Reads an image as ``[H, W, 3]`` uint8 RGB."""
  img = _open(path, 'image')
  if img.mode not in ('RGB', 'RGBA', 'L', 'P'):
    raise DataError(
        f'Image {path} has PIL mode {img.mode!r}; expected an '
        '8-bit RGB image.'
    )
  return np.asarray(img.convert('RGB'))


def decode_rgb(data: bytes) -> np.ndarray:
  """Encoded image bytes (PNG/JPEG) -> ``[H, W, 3]`` uint8 RGB."""
  return np.asarray(Image.open(io_lib.BytesIO(data)).convert('RGB'))


def decode_ids(data: bytes) -> np.ndarray:
  """Single-channel PNG bytes -> ``[H, W]`` uint8 ids."""
  return np.asarray(Image.open(io_lib.BytesIO(data)))


def read_label(path: str) -> np.ndarray:
  """Reads a single-channel 8-bit id map (``L`` or palette ``P`` PNG).

  Returns:
    ``[H, W]`` uint8 raw ids.
  """
  img = _open(path, 'label')
  if img.mode not in ('L', 'P'):
    raise DataError(
        f'Label {path} has PIL mode {img.mode!r}; expected a '
        'single-channel 8-bit id map (mode L or P).'
    )
  return np.asarray(img)


def read_label16_channel0(path: str) -> np.ndarray:
  """Reads channel 0 (R) of a 16-bit RGB PNG class map (SYNTHIA).

  Pillow reads 16-bit RGB PNGs by keeping only the high byte of each sample,
  which silently turns SYNTHIA's small class ids into zeros, so these files
  are decoded with OpenCV (``IMREAD_UNCHANGED`` keeps 16 bits; its channel
  order is BGR).

  Returns:
    ``[H, W]`` uint16 raw class ids.
  """
  if not os.path.exists(path):
    raise DataError(f'Missing label: {path}')
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f'Reading the 16-bit label {path} needs OpenCV: pip '
        'install opencv-python-headless (see requirements.txt).'
    ) from e
  arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if arr is None:
    raise DataError(
        f'Cannot decode label {path}: not a readable PNG. '
        'Expected a 16-bit RGB PNG with the class id in '
        'channel 0.'
    )
  if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[-1] < 3:
    raise DataError(
        f'Label {path} is {arr.dtype} with shape {arr.shape}; '
        'expected a 16-bit RGB PNG with the class id in channel '
        '0 (SYNTHIA GT/LABELS).'
    )
  return arr[..., 2]  # BGR(A) -> R


def encode_png(array: np.ndarray) -> bytes:
  """Lossless PNG bytes of an ``[H, W]`` or ``[H, W, 3]`` uint8 array."""
  buf = io_lib.BytesIO()
  Image.fromarray(array).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def check_image(path: str) -> tuple[int, int]:
  """Fully decodes an image (catching truncation); returns ``(H, W)``."""
  img = _open(path, 'image')
  if img.mode not in ('RGB', 'RGBA', 'L', 'P'):
    raise DataError(
        f'Image {path} has PIL mode {img.mode!r}; expected an '
        '8-bit RGB image.'
    )
  return img.size[1], img.size[0]


def check_ids(label: np.ndarray, valid: np.ndarray, path: str) -> None:
  """Raises if ``label`` holds ids outside the boolean table ``valid``."""
  present = np.unique(label)
  bad = present[~valid[present]]
  if bad.size:
    raise DataError(
        f'Label {path} contains unexpected ids {bad.tolist()}; '
        f'expected ids in {np.flatnonzero(valid).tolist()}.'
    )


def read_flow(
    path: str, expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
  """Reads an ``int16(10 F)`` flow file as ``[H, W, 2]`` float32 pixels."""
  if not os.path.exists(path):
    raise DataError(f'Missing flow file: {path}. {FLOW_HELP}')
  try:
    arr = np.load(path, allow_pickle=False)
  except Exception as e:
    raise DataError(f'Cannot read flow {path}: {e}. {FLOW_HELP}') from e
  if arr.ndim != 3 or arr.shape[-1] != 2:
    raise DataError(
        f'Flow {path} has shape {arr.shape}; expected ' '[H, W, 2].'
    )
  if arr.dtype != np.int16:
    raise DataError(
        f'Flow {path} has dtype {arr.dtype}; expected int16 '
        '(10x the flow in pixels).'
    )
  if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
    raise DataError(
        f'Flow {path} is {arr.shape[:2]}; expected '
        f'{tuple(expected_hw)} like its frame.'
    )
  return arr.astype(np.float32) / 10.0


def stack_frames(paths: list[str]) -> np.ndarray:
  """Reads a clip's frames as ``[T, H, W, 3]``; they must share one size."""
  frames = [read_rgb(p) for p in paths]
  for p, f in zip(paths[1:], frames[1:]):
    if f.shape != frames[0].shape:
      raise DataError(
          f'Frame {p} is {f.shape[:2]} but {paths[0]} is '
          f'{frames[0].shape[:2]}; the frames of a clip must '
          'have one size.'
      )
  return np.stack(frames)


def check_flow_grid(
    flow: np.ndarray, frame_hw: tuple[int, int], path: str
) -> None:
  """Raises if a flow's grid is not a rescaled copy of its frame's grid.

  Flows may be stored at a lower resolution (VIPER: 576x1024 for 1080x1920
  frames); they are resized with magnitude scaling, which is only right if
  the aspect ratio matches.
  """
  fh, fw = flow.shape[:2]
  h, w = frame_hw
  if abs(fh / fw - h / w) > 0.01 * (h / w):
    raise DataError(
        f'Flow {path} is {fh}x{fw} but its frame is {h}x{w}; '
        'expected the same aspect ratio (a resized copy of the '
        "frame's grid)."
    )


def remove_ego_vehicle(
    raw: np.ndarray, car_id: int, replacement: int = 0
) -> np.ndarray:
  """Relabels the car component touching the bottom-row centre pixel.

  VIPER labels the player's own vehicle as car; the reference removes the
  8-connected component (``cv2.connectedComponents``' default) of
  ``raw == car_id`` that contains the bottom-row centre pixel
  (docs/reference_code.md, "Label maps").

  Args:
    raw: ``[H, W]`` raw ids.
    car_id: raw id of car.
    replacement: raw id written over the ego vehicle (one that maps to 255).

  Returns:
    A copy of ``raw`` without the ego vehicle.
  """
  h, w = raw.shape
  if raw[h - 1, w // 2] != car_id:
    return raw
  components, _ = scipy.ndimage.label(
      raw == car_id, structure=np.ones((3, 3), bool)
  )
  out = raw.copy()
  out[components == components[h - 1, w // 2]] = replacement
  return out
