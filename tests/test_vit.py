"""The transformer video model: released-layout conversion and the whole
two-frame forward against PyTorch (transformers' MiT encoder, the restated
DAFormer head, the ACCEL fusion by ``grid_sample``)."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers import SegformerConfig
from transformers import SegformerModel

from configs import viper_vit
from dastc_jax import convert
from dastc_jax import models
from dastc_jax.benchmarks import faults
from tests import torch_accel
from tests import torch_daformer
from dastc_jax.models import mit
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import sharding as sharding_lib
from dastc_jax.runtime import state as state_lib
from tests import test_mit
from tests import torch_helpers

torch.set_num_threads(1)


def _model_config():
  return viper_vit.get_config('smoke').model  # the 'tiny' MiT, 15 classes


def _torch_parts(mc, seed=0):
  spec = mit.VARIANTS[mc.mit_variant]
  torch.manual_seed(seed)
  hf = SegformerModel(
      SegformerConfig(
          hidden_sizes=list(spec.dims),
          depths=list(spec.depths),
          num_attention_heads=list(spec.heads),
          sr_ratios=list(spec.sr_ratios),
          drop_path_rate=0.0,
      )
  ).eval()
  test_mit.use_mmseg_epsilons(hf)
  head = torch_daformer.DAFormerHead(
      spec.dims, mc.num_classes, mc.head_features, tuple(mc.daformer_dilations)
  ).eval()
  sf = torch.nn.Conv2d(2 * mc.num_classes, mc.num_classes, 1, bias=False)
  torch_helpers.randomize_batchnorm(head, seed + 1)
  with torch.no_grad():
    sf.weight.normal_(0, 0.3)
  sd = {
      'model.' + k: v
      for k, v in test_mit.hf_to_mmseg(
          {k: v.numpy() for k, v in hf.state_dict().items()}
      ).items()
  }
  sd.update({'decoder.' + k: v.numpy() for k, v in head.state_dict().items()})
  sd['decoder.sf_layer.weight'] = sf.weight.detach().numpy()
  return hf, head, sf, sd


def test_released_layout_converts_and_the_video_forward_matches():
  mc = _model_config()
  hf, head, sf, sd = _torch_parts(mc)
  params, stats, report = convert.convert_state_dict(sd, mc)
  assert report.layout == 'quadmix_vit' and not report.missing_initialised
  graphdef = state_lib.model_graphdef(ml_collections.ConfigDict({'model': mc}))
  model = nnx.merge(graphdef, params, stats)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (1, 2, 64, 96, 3), dtype=np.uint8)
  frames = np.asarray(image_ops.normalize(rgb))  # our input convention
  flow = rng.normal(0, 2, (1, 64, 96, 2)).astype(np.float32)
  out = jax.jit(lambda m, f, fl: m.clip(f, fl, train=False))(
      model, jnp.asarray(frames), jnp.asarray(flow)
  )
  # PyTorch: ImageNet-normalised RGB into the encoder, head, ACCEL fusion.
  mean = np.asarray(mit.IMAGENET_MEAN_RGB, np.float32)
  std = np.asarray(mit.IMAGENET_STD_RGB, np.float32)
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

  def scores(x):
    feats = hf(
        nchw((x.astype(np.float32) - mean) / std), output_hidden_states=True
    ).hidden_states
    return head(list(feats))[0]

  with torch.no_grad():
    cur, key = scores(rgb[:, 0]), scores(rgb[:, 1])
    pred = torch_accel.fuse(sf, cur, key, nchw(flow))
  for got, want in ((out['logits'], cur), (out['pred'], pred)):
    want = np.moveaxis(want.numpy(), 1, -1)
    assert got.shape == want.shape == (1, 16, 24, mc.num_classes)  # stride 4
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
  # Extra keys (an EMA copy) stop the conversion unless allowed.
  extra = {**sd, 'ema_model.patch_embed1.proj.weight': np.zeros(3)}
  with pytest.raises(convert.ConversionError, match='1 unexpected'):
    convert.convert_state_dict(extra, mc)
  _, _, rep = convert.convert_state_dict(
      extra, mc, allow_unexpected=(r'ema_model\.',)
  )
  assert rep.ignored == ['ema_model.patch_embed1.proj.weight']
  # The key frame really contributes.
  assert np.abs(np.asarray(out['pred'] - out['logits'])).max() > 1e-2


def test_imagenet_mit_converts_the_encoder_only():
  mc = _model_config()
  _, _, _, sd = _torch_parts(mc)
  imagenet = {
      k[len('model.') :]: v for k, v in sd.items() if k.startswith('model.')
  }
  imagenet['head.weight'] = np.zeros((1000, 64), np.float32)
  imagenet['head.bias'] = np.zeros((1000,), np.float32)
  params, _, report = convert.convert_state_dict(imagenet, mc)
  assert report.layout == 'mit'
  assert report.ignored == ['head.bias', 'head.weight']
  assert report.missing_initialised == ['head/', 'sf_layer/']
  np.testing.assert_array_equal(
      params['backbone']['block1'][0]['attn']['kv']['kernel'],
      imagenet['block1.0.attn.kv.weight'].T,
  )
  # Into the DeepLab model: refused with the reason.
  from configs import viper  # pylint: disable=g-import-not-at-top

  with pytest.raises(convert.ConversionError, match='not a transformer'):
    convert.convert_state_dict(imagenet, viper.get_config('smoke').model)


def test_vit_smoke_config_trains_dastc(world_cache, tmp_path):
  """``configs/viper_vit.py:smoke`` without its source-only step, in
  bfloat16: two DA-STC steps (pseudo-labels, both fusions after MiT
  stage c1, alignment on the DAFormer feature; the second pastes from the
  carried state), then evaluation; the second step moves the encoder and
  the fusion layer. (The source-only step is the CNN's,
  model-agnostic and tested there; FSDP and bfloat16 against 1 device and
  float32 are checked on the CNN in ``test_scale.py``.)"""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from dastc_jax import train  # pylint: disable=g-import-not-at-top
  from dastc_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top

  c = viper_vit.get_config('smoke')
  c.data.synthetic.cache_dir = world_cache
  c.eval.num_overlays = 0
  # The global batch of 4 on 4 of the 8 simulated devices, computed in
  # bfloat16. (FSDP: the B5 layout test below and the CNN's FSDP tests in
  # test_scale.py; the same run on data=2 x fsdp=2 passes too, 20 s more.)
  c.mesh.data = 4
  c.model.dtype = 'bfloat16'
  c.eval.splits = ('target_val',)
  c.train.source_only_steps = 0  # one compiled step...
  c.dastc.allow_untrained_teacher = True  # ...from an initialised model
  workdir = str(tmp_path / 'vit')
  final = train.train_and_evaluate(c, workdir)
  assert set(final) == {'target_val'} and 0.0 <= final['target_val'] <= 100
  with open(os.path.join(workdir, 'eval', 'step_2', 'results.json')) as f:
    assert json.load(f)['step'] == 2
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), async_save=False, read_only=True
  )
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  assert steps[-2:] == [1, 2]
  # The second DA-STC step moved the encoder and the fusion layer.
  s1, _ = faults.final_state(workdir, 1)
  s2, _ = faults.final_state(workdir, 2)
  for part in ('backbone', 'sf_layer'):
    a, b = jax.tree.leaves(s1['params'][part]), jax.tree.leaves(
        s2['params'][part]
    )
    assert (
        max(
            float(np.abs(np.asarray(x) - np.asarray(y)).max())
            for x, y in zip(a, b)
        )
        > 0
    ), part


def test_b5_video_state_is_fsdp_sharded_in_eighths(monkeypatch):
  """The full-size QuadMix-ViT train state (MiT-B5 + DAFormer, ~85M
  parameters, the AdamW moments) on data=1 x fsdp=8: each device holds
  little more than an eighth of it (shapes only, nothing allocated)."""
  # Tracing B5's initialisation takes 10-20 s in this flax/jax pair: each of
  # its ~2000 RNG draws makes JAX build an error text by walking the whole
  # trace (docs/performance.md). Only that text is skipped here.
  from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(
      partial_eval.DynamicJaxprTracer, '_origin_msg', lambda self: ''
  )
  c = viper_vit.get_config()
  c.method = 'source_only'
  c.mesh.data, c.mesh.fsdp = 1, 8
  state = state_lib.abstract_train_state(c)
  mesh = sharding_lib.make_mesh(c)
  shardings = sharding_lib.state_shardings(state, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  assert 84e6 < n_params < 86e6, n_params
  total = per_device = 0
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    nbytes = x.size * x.dtype.itemsize
    total += nbytes
    per_device += nbytes * np.prod(s.shard_shape(x.shape)) / max(x.size, 1)
  assert total > 3 * 4 * 84e6  # params and the two AdamW moments
  assert per_device < total / 8 * 1.05, per_device / total


def test_exported_imagenet_mit_file_converts_back_to_the_same_encoder():
  """The rehearsal's stand-in ImageNet file: our initialised encoder in the
  ``mit`` layout, which ``convert`` reads back tensor for tensor."""
  mc = _model_config()
  sd = convert.export_mit_imagenet(mc, seed=3)
  assert convert.detect_layout(list(sd)) == 'mit'
  params, _, report = convert.convert_state_dict(sd, mc)
  assert report.ignored == ['head.bias', 'head.weight']
  model = models.build_model(mc, nnx.Rngs(params=3))
  ref = nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param))
  got = jax.tree.leaves_with_path(params['backbone'])
  want = dict(jax.tree.leaves_with_path(ref))
  assert len(got) == len(want) > 0
  for path, value in got:
    np.testing.assert_array_equal(value, want[path], err_msg=str(path))
