"""Multi-resolution (HRDA) and masked consistency (MIC): the model against
a PyTorch restatement of HRDA's formulas (``tests/torch_hrda.py``), the
fusion and loss with a training crop, sliding windows, crop sampling, MIC
masks and the config checks."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import gta5
from configs import gta5_vit
from dastc_jax import convert
from dastc_jax import errors
from dastc_jax import models
from dastc_jax.method import losses
from dastc_jax.models import hrda
from dastc_jax.models import mit
from dastc_jax.ops import image as image_ops
from dastc_jax.ops import masking
from dastc_jax.runtime import validation
from tests import test_vit
from tests import torch_daformer
from tests import torch_helpers
from tests import torch_hrda

torch.set_num_threads(1)


def _vit_hrda_config(crop=(32, 32)):
  c = gta5_vit.get_config('smoke')
  c.model.hrda.enabled = True
  c.model.hrda.detail_crop = crop
  c.model.hrda.attention_features = 16
  c.loss.aux_weight = 0.0
  return c


def _np_sd(m):
  return {
      k: v.numpy()
      for k, v in m.state_dict().items()
      if not k.endswith('num_batches_tracked')
  }


def _torch_hrda(mc):
  """transformers' MiT, the restated DAFormer head and attention head
  (random BatchNorm statistics): ``(scores(img), state_dict)``, the state
  dict in the released ``HRDAEncoderDecoder`` names of a UDA checkpoint."""
  spec = mit.VARIANTS[mc.mit_variant]
  hf, head, _, sd = test_vit._torch_parts(mc)  # pylint: disable=protected-access
  att = torch_daformer.DAFormerHead(
      spec.dims, mc.num_classes, mc.hrda.attention_features, fusion='conv'
  ).eval()
  torch_helpers.randomize_batchnorm(att, 2)
  released = {}
  for k, v in sd.items():
    if k.startswith('model.'):
      released['model.backbone.' + k[len('model.') :]] = v
    elif not k.startswith('decoder.sf_layer'):
      released['model.decode_head.head.' + k[len('decoder.') :]] = v
  for k, v in _np_sd(att).items():
    released['model.decode_head.scale_attention.' + k] = v

  def scores_of(h):
    return lambda x: h(list(hf(x, output_hidden_states=True).hidden_states))[0]

  def scores(img):
    with torch.no_grad():
      return torch_hrda.encode_decode(
          scores_of(head), scores_of(att), img, (32, 32), os=4
      )

  return scores, released


def _torch_input(rgb):
  mean = np.asarray(mit.IMAGENET_MEAN_RGB, np.float32)
  std = np.asarray(mit.IMAGENET_STD_RGB, np.float32)
  return torch.from_numpy(
      np.ascontiguousarray(
          np.moveaxis((rgb[:, 0].astype(np.float32) - mean) / std, -1, 1)
      )
  )


def test_released_checkpoint_converts_and_eval_forward_matches_pytorch():
  """A released HRDA / MIC checkpoint (mmseg's ``HRDAEncoderDecoder`` under
  ``model.``, with the EMA and ImageNet copies a UDA checkpoint holds)
  converts with the documented command's function, and the converted
  model's evaluation forward (context pass at half resolution, detail
  windows sliding with half overlap, class-wise attention) gives the fused
  scores of the PyTorch restatement with the same weights."""
  c = _vit_hrda_config()
  mc = c.model
  torch_scores, released = _torch_hrda(mc)
  uda = dict(released)
  for k, v in released.items():
    uda['ema_model.' + k[len('model.') :]] = v
  uda['imnet_model.backbone.patch_embed1.proj.weight'] = released[
      'model.backbone.patch_embed1.proj.weight'
  ]
  assert convert.detect_layout(list(uda)) == 'hrda'
  params, stats, report = convert.convert_state_dict(uda, mc, source='m.pth')
  assert report.layout == 'hrda' and not report.missing_initialised
  assert sorted(report.converted) == sorted(
      k for k in released if not k.endswith('num_batches_tracked')
  )
  assert all(k.startswith(('ema_model.', 'imnet')) for k in report.ignored)
  graphdef = nnx.graphdef(models.build_model(mc, nnx.Rngs(0)))
  model = nnx.merge(graphdef, params, stats)

  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 1, 64, 96, 3), dtype=np.uint8)
  out = jax.jit(lambda m, f: m.clip(f, None, train=False))(
      model, image_ops.normalize(jnp.asarray(rgb))
  )
  want = np.moveaxis(torch_scores(_torch_input(rgb)).numpy(), 1, -1)
  got = np.asarray(out['pred'])
  assert got.shape == want.shape == (2, 16, 24, mc.num_classes)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 1e-4, rel
  # The same file into a single-scale config is refused with the reason.
  c.model.hrda.enabled = False
  with pytest.raises(convert.ConversionError, match='hrda.enabled is False'):
    convert.convert_state_dict(uda, c.model, source='m.pth')


def test_training_fusion_and_loss_match_the_pytorch_restatement():
  """The crop-time fusion (attention zero outside the crop, detail scores
  placed at the crop) and the 0.9 / 0.1 loss, with a crop inside the image,
  against PyTorch."""
  rng = np.random.default_rng(1)
  b, k = 2, 5
  lr = rng.normal(size=(b, 8, 12, k)).astype(np.float32)  # 64x96 / 8
  att = 1 / (1 + np.exp(-rng.normal(size=(b, 8, 12, k)))).astype(np.float32)
  hr = rng.normal(size=(b, 8, 8, k)).astype(np.float32)  # a 32x32 crop / 4
  box = (16, 48, 32, 64)  # y1, y2, x1, x2; multiples of 8
  got = hrda.fuse(
      jnp.asarray(lr),
      jnp.asarray(att),
      jnp.asarray(hr),
      jnp.array([16, 32]),
      input_hw=(64, 96),
      crop_hw=(32, 32),
      context_scale=0.5,
  )
  t = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  want = torch_hrda.fuse(t(lr), t(att), t(hr), box, os=4)
  np.testing.assert_allclose(
      np.asarray(got), np.moveaxis(want.numpy(), 1, -1), atol=1e-5
  )
  # Away from the crop (fused rows 0-2; the crop starts at row 4, and
  # bilinear upsampling reaches one row further) the fused scores are the
  # upsampled context's.
  up = np.moveaxis(torch_hrda.up2(t(lr)).numpy(), 1, -1)
  np.testing.assert_allclose(np.asarray(got)[:, :3], up[:, :3], atol=1e-5)
  # The loss, labels on the score grid (no resize on either side).
  label = rng.integers(0, k, (b, 16, 24)).astype(np.int64)
  label[0, :3] = 255
  seg = losses.segmentation_loss(_vit_hrda_config((32, 32)).model)
  out = {
      'pred': got,
      'detail': jnp.asarray(hr),
      'detail_box': jnp.array([16, 32]),
  }
  ours = seg(out, jnp.asarray(label), (64, 96))
  theirs = torch_hrda.loss(
      want,
      t(hr),
      torch.from_numpy(label),
      tuple(v // 4 for v in box),
      weight=0.1,
  )
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


def test_sliding_windows_cover_the_grid_and_average_overlaps():
  """Windows follow mmseg's rule; every cell of the grid is covered, also
  for a DeepLab-style grid one cell larger than size / 8."""
  assert hrda.slide_boxes((64, 96), (32, 32), (16, 16))[:4] == [
      (0, 32, 0, 32),
      (0, 32, 16, 48),
      (0, 32, 32, 64),
      (0, 32, 48, 80),
  ]
  boxes = hrda.slide_boxes((40, 100), (32, 32), (16, 16))
  assert boxes[-1] == (8, 40, 68, 100)  # the last ones moved back inside
  x = jnp.zeros((1, 40, 100, 3))
  for grid, cells in (((10, 25), (8, 8)), ((6, 14), (5, 5))):
    ones = hrda.slide(
        lambda w: jnp.ones((w.shape[0], *cells, 2)), x, (32, 32), grid
    )
    np.testing.assert_allclose(np.asarray(ones), 1.0)
  # Overlapping windows average: a window index written as its score.
  n = len(boxes)
  idx = jnp.arange(n, dtype=jnp.float32).repeat(1)[:, None, None, None]
  avg = hrda.slide(
      lambda w: jnp.broadcast_to(idx, (n, 8, 8, 1)), x, (32, 32), (10, 25)
  )
  cols = 25
  assert float(avg[0, 0, 0, 0]) == 0.0
  assert float(avg[0, 0, 5, 0]) == pytest.approx((0 + 1) / 2)  # two windows
  assert float(avg[0, 9, cols - 1, 0]) == n - 1
  # Windows that return their own pixels rebuild the image, with any
  # stride (the evaluation's 1024 windows every 512 px, scaled down).
  img = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 100, 3)))
  for window, stride in (((32, 32), (16, 16)), ((32, 48), (8, 20))):
    back = hrda.slide(lambda w: w, img, window, (40, 100), stride)
    np.testing.assert_allclose(np.asarray(back), np.asarray(img), atol=1e-6)


def test_detail_crops_are_on_the_divisible_grid_as_hrda_draws_them():
  """Offsets ``randint(0, (margin + 1) // d) * d``, as released: with a
  margin that is a multiple of d the last place (flush with the edge) is
  never drawn (margins 32 and 64: 4 x 8 places)."""
  seen = set()
  for i in range(300):
    y, x = (
        int(v)
        for v in hrda.sample_box(jax.random.key(i), (64, 96), (32, 32), 8)
    )
    assert y % 8 == 0 and x % 8 == 0 and 0 <= y < 32 and 0 <= x < 64
    seen.add((y, x))
  assert len(seen) == 4 * 8
  assert tuple(hrda.sample_box(jax.random.key(0), (32, 32), (32, 32), 8)) == (
      0,
      0,
  )


def test_mic_masks_hide_blocks_at_the_ratio():
  m = np.asarray(masking.block_mask(jax.random.key(0), (64, 256, 512), 64, 0.7))
  assert m.shape == (64, 256, 512) and set(np.unique(m)) <= {0.0, 1.0}
  blocks = m.reshape(64, 4, 64, 8, 64)
  # Constant within each 64x64 block.
  assert np.all(blocks.min((2, 4)) == blocks.max((2, 4)))
  assert abs(m.mean() - 0.3) < 0.02  # 2048 blocks; 0.3 visible
  # A side that is not a multiple: round(100 / 64) = 2 cells of 50 px.
  m = np.asarray(masking.block_mask(jax.random.key(1), (256, 100, 64), 64, 0.5))
  assert np.all(m[:, :50].min(1) == m[:, :50].max(1))
  assert np.all(m[:, 50:].min(1) == m[:, 50:].max(1))
  x = jnp.ones((2, 2, 8, 8, 3))
  mask = jnp.zeros((2, 8, 8)).at[:, :4].set(1)
  out = masking.mask_clip(x, mask)
  assert float(out[:, :, :4].min()) == 1 and float(out[:, :, 4:].max()) == 0


@pytest.mark.parametrize(
    'change, message',
    [
        (lambda c: setattr(c.loss, 'aux_weight', 0.1), 'aux_weight'),
        (
            lambda c: setattr(c.model.hrda, 'crop_divisible', 4),
            'multiples of 8',
        ),
        (lambda c: setattr(c.model.hrda, 'detail_crop', (64, 64)), 'larger'),
    ],
)
def test_config_checks(change, message):
  c = _vit_hrda_config((16, 16))
  validation.check_config(c)
  change(c)
  with pytest.raises(errors.ConfigError, match=message):
    validation.check_config(c)


def test_video_model_crops_every_frame_at_one_place():
  """The multi-resolution video model: frame t and the key frame t-1 get
  the same detail crop. With identical frames, zero flow and no dropout the
  key frame's fused scores equal frame t's; the clip's fused prediction is
  the flow fusion of the two full-grid fused maps, and its detail loss
  reads frame t's detail crop."""
  from configs import viper_hrda  # pylint: disable=g-import-not-at-top

  c = viper_hrda.get_config('smoke')
  validation.check_config(c)
  c.model.dropout = 0.0
  c.model.drop_path_rate = 0.0
  graphdef, params, stats = nnx.split(
      models.build_model(c.model, nnx.Rngs(0)), nnx.Param, nnx.BatchStat
  )
  frame = np.random.default_rng(0).normal(size=(2, 1, 32, 48, 3))
  x = jnp.asarray(np.concatenate([frame, frame], 1), jnp.float32)
  flow = jnp.zeros((2, 32, 48, 2))

  def clip(p, st, k, train=True):
    return nnx.merge(graphdef, p, st).clip(x, flow, train=train, rng=k)

  train = jax.jit(clip)  # compiled once for the three crops
  for seed in range(3):
    out = train(params, stats, jax.random.key(seed))
    np.testing.assert_allclose(
        np.asarray(out['key_logits']), np.asarray(out['logits']), atol=1e-5
    )
    assert out['pred'].shape == out['logits'].shape == (2, 8, 12, 15)
    assert out['detail'].shape == (2, 4, 6, 15)
  seg = losses.segmentation_loss(c.model)
  label = jnp.zeros((2, 32, 48), jnp.int32)
  # Differentiated in both (a train-mode pass updates the statistics,
  # which nnx allows only on the trace it differentiates).
  grads, _ = jax.jit(
      jax.grad(
          lambda p, st: seg(clip(p, st, jax.random.key(0)), label, (32, 48)),
          argnums=(0, 1),
      )
  )(params, stats)
  assert float(optax_norm(grads['scale_attention'])) > 0
  assert float(optax_norm(grads['sf_layer'])) > 0
  ev = jax.jit(lambda p, st: clip(p, st, None, train=False))(params, stats)
  assert ev['pred'].shape == (2, 8, 12, 15) and 'detail' not in ev


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree)))


def test_deeplab_model_trains_and_evaluates_with_detail_loss():
  """DeepLab-v2 (grid one cell larger than size / 8): a training forward
  gives fused scores, the detail crop's scores and its box; evaluation
  slides without uncovered cells."""
  c = gta5.get_config('smoke')
  c.model.hrda.enabled = True
  c.model.hrda.detail_crop = (16, 32)
  c.model.hrda.crop_divisible = 16
  c.model.hrda.attention_features = 8
  c.loss.aux_weight = 0.0
  validation.check_config(c)
  model = models.build_model(c.model, nnx.Rngs(0))
  x = jnp.asarray(
      np.random.default_rng(0).normal(size=(2, 1, 32, 48, 3)), jnp.float32
  )
  # Jitted: run eagerly, it compiles some 500 primitives one by one.
  clip = nnx.jit(
      lambda m, x, train, rng: m.clip(x, None, train=train, rng=rng),
      static_argnums=2,
  )
  out = clip(model, x, True, jax.random.key(3))
  assert out['detail_box'].shape == (2,) and int(out['detail_box'][0]) % 16 == 0
  assert out['detail'].shape[1:3] == (3, 5)
  seg = losses.segmentation_loss(c.model)
  label = jnp.zeros((2, 32, 48), jnp.int32)
  assert np.isfinite(float(seg(out, label, (32, 48))))
  ev = clip(model, x, False, None)
  assert np.all(np.isfinite(np.asarray(ev['pred'])))
  assert 'detail' not in ev


def test_hrda_smoke_config_trains_dastc_with_mic(world_cache, tmp_path):
  """``configs/gta5_hrda.py:smoke`` without its source-only step (HRDA's
  source-only training is the DeepLab test's above): three DA-STC steps
  with HRDA (detail loss in every term) and MIC on the masked target,
  quality-weighted pseudo-labels ignored in the frame's margins, rare-class
  sampling and the ImageNet feature distance; evaluation slides the detail
  windows."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from configs import gta5_hrda  # pylint: disable=g-import-not-at-top
  from dastc_jax import train  # pylint: disable=g-import-not-at-top

  c = gta5_hrda.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.eval.num_overlays = 0
  c.train.num_steps = 3
  c.train.source_only_steps = 0  # one compiled step...
  c.dastc.allow_untrained_teacher = True  # ...from an initialised model
  c.mesh.data = 2  # the batch of 4 split over 2 of the simulated devices
  # From an initialised model no pixel reaches 0.968 (weight 0, every
  # pseudo-labelled term 0); at threshold 0 every clip has weight 1.
  c.dastc.pl_quality_threshold = 0.0
  workdir = str(tmp_path / 'hrda')
  final = train.train_and_evaluate(c, workdir)
  assert 0.0 <= final['target_val'] <= 100
  with open(os.path.join(workdir, 'eval', 'step_3', 'results.json')) as f:
    assert json.load(f)['step'] == 3
  from dastc_jax.benchmarks import logged  # pylint: disable=g-import-not-at-top

  keys = (
      'loss_mic',
      'pl_quality',
      'loss_tgt_mix',
      'pl_margin_share',
      'loss_fd',
      'fd_cells',
  )
  means = logged.run_means(workdir, keys)
  for key in keys:
    assert np.isfinite(means[key]), key
  assert means['pl_quality'] == 1.0 and means['loss_mic'] > 0
  # HRDA's pseudo-label margins reach the step: part of the crops lies in
  # them (margins 2, 6, 2, 2 px of the smoke target frame).
  assert 0 < means['pl_margin_share'] < 0.5
  # The feature distance runs (its classes rarely fill a 64x64 cell of the
  # tiny world: tests/test_feature_distance.py checks its values).
  assert means['loss_fd'] >= 0 and 0 <= means['fd_cells'] <= 1
