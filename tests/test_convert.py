"""PyTorch -> Flax conversion and parity against a PyTorch restatement.

The reference is ``dastc_jax/benchmarks/torch_accel.py``: the ACCEL model in
torch layers with the reference module names (its ``state_dict`` has the
keys of a released checkpoint), the warp by ``grid_sample`` (align corners,
border padding). Weights are random, BatchNorm statistics too.
"""

import os

from flax import nnx
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import viper
from tests import torch_accel
from dastc_jax import convert
from dastc_jax import models
from dastc_jax.data import labels as labels_lib
from dastc_jax.data import pipeline
from dastc_jax.evaluation import eval_job
from dastc_jax.ops import image as image_ops
from dastc_jax.runtime import state as state_lib
from dastc_jax import train

torch.set_num_threads(1)


def _model_config(head='proda', classes=5, stride_in_1x1=True):
  c = viper.get_config().model
  c.layers = (2, 1, 1, 1)
  c.width = 8
  c.head_features = 16
  c.num_classes = classes
  c.head = head
  c.stride_in_1x1 = stride_in_1x1
  return c


def _torch_model(mc, seed=0):
  torch.manual_seed(seed)
  m = torch_accel.AccelDeepLab(
      mc.num_classes,
      tuple(mc.layers),
      mc.width,
      mc.head_features,
      tuple(mc.aspp_dilations),
      head=mc.head,
      stride_in_1x1=mc.stride_in_1x1,
  )
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        n = mod.num_features
        mod.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        mod.bias.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
      elif isinstance(mod, torch.nn.Conv2d):
        fan_in = mod.weight[0].numel()
        mod.weight.copy_(
            torch.randn(mod.weight.shape, generator=g) / np.sqrt(fan_in)
        )
        if mod.bias is not None:
          mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
  return m.eval()


def _flax_model(mc, params, stats):
  graphdef = state_lib.model_graphdef(ml_collections.ConfigDict({'model': mc}))
  return nnx.merge(graphdef, params, stats)


def _inputs(h=40, w=56, seed=0):
  rng = np.random.default_rng(seed)
  rgb = rng.integers(0, 256, (1, 2, h, w, 3), dtype=np.uint8)
  frames = np.asarray(image_ops.normalize(rgb))  # BGR, mean subtracted
  flow = rng.normal(0, 2, (1, h, w, 2)).astype(np.float32)
  return frames, flow


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('head', ['proda', 'aspp'])
def test_fused_logits_and_backbone_match_pytorch(head):
  mc = _model_config(head)
  tm = _torch_model(mc)
  params, stats, report = convert.convert_state_dict(
      {k: v.numpy() for k, v in tm.state_dict().items()}, mc
  )
  assert report.layout == 'accel' and not report.missing_initialised
  assert all(k.endswith('num_batches_tracked') for k in report.ignored)
  model = _flax_model(mc, params, stats)
  frames, flow = _inputs()
  out = model.clip(jnp.asarray(frames), jnp.asarray(flow), train=False)
  with torch.no_grad():
    pred, pred_aux = tm(_nchw(frames[:, 0]), _nchw(frames[:, 1]), _nchw(flow))
    l3, l4 = tm.backbone(_nchw(frames[:, 0]))
  feats = model.backbone(jnp.asarray(frames[:, 0]), False)
  nhwc = lambda t: np.moveaxis(t.numpy(), 1, -1)
  assert out['pred'].shape == nhwc(pred).shape == (1, 6, 8, 5)
  assert _rel(np.asarray(feats['layer3']), nhwc(l3)) < 1e-4
  assert _rel(np.asarray(feats['layer4']), nhwc(l4)) < 1e-4
  assert _rel(np.asarray(out['pred']), nhwc(pred)) < 1e-4
  assert _rel(np.asarray(out['pred_aux']), nhwc(pred_aux)) < 1e-4
  # The key frame really contributes (sf_layer is random, not [I | 0]).
  assert _rel(np.asarray(out['pred']), np.asarray(out['logits'])) > 1e-2


def test_torchvision_layout_folds_the_input_normalisation():
  mc = _model_config(stride_in_1x1=False)
  tm = _torch_model(mc, seed=3)
  sd = {
      k: v.numpy()
      for k, v in tm.state_dict().items()
      if not k.startswith(('layer5', 'layer7', 'sf_layer'))
  }
  sd['fc.weight'] = np.zeros((1000, 256), np.float32)
  sd['fc.bias'] = np.zeros((1000,), np.float32)
  params, stats, report = convert.convert_state_dict(sd, mc)
  assert report.layout == 'torchvision'
  assert 'fc.weight' in report.ignored
  assert any(p.startswith('head/') for p in report.missing_initialised)
  model = _flax_model(mc, params, stats)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
  ours = np.asarray(image_ops.normalize(rgb))
  tv = (rgb / 255.0 - convert._TV_MEAN) / convert._TV_STD  # pylint: disable=protected-access
  stem = np.asarray(
      model.backbone.bn1(model.backbone.conv1(jnp.asarray(ours)), False)
  )
  with torch.no_grad():
    ref = tm.bn1(tm.conv1(_nchw(tv.astype(np.float32))))
  ref = np.moveaxis(ref.numpy(), 1, -1)
  # Exact away from conv1's 3-pixel zero padding (2 output pixels).
  inner = (slice(None), slice(2, -2), slice(2, -2))
  assert _rel(stem[inner], ref[inner]) < 1e-4
  # The torchvision stride placement: layer2 strides in its 3x3 conv.
  assert params['backbone']['layer2'][0]['conv2']['kernel'].shape == (
      3,
      3,
      16,
      16,
  )


def test_caffe_layout_and_what_is_reported():
  mc = _model_config()
  tm = _torch_model(mc)
  sd = {
      'Scale.' + k: v.numpy()
      for k, v in tm.state_dict().items()
      if not k.startswith(('layer5', 'layer7', 'sf_layer'))
  }
  sd['Scale.layer5.conv2d_list.0.weight'] = np.zeros(
      (21, 256, 3, 3), np.float32
  )
  params, _, report = convert.convert_state_dict(sd, mc)
  assert report.layout == 'caffe'
  assert 'layer5.conv2d_list.0.weight' in report.ignored
  assert sorted({p.split('/')[0] for p in report.missing_initialised}) == [
      'aux_head',
      'head',
      'sf_layer',
  ]
  np.testing.assert_array_equal(
      params['backbone']['conv1']['kernel'],
      np.transpose(tm.conv1.weight.detach().numpy(), (2, 3, 1, 0)),
  )


def test_mismatches_are_reported_by_name(tmp_path):
  mc = _model_config()
  sd = {k: v.numpy() for k, v in _torch_model(mc).state_dict().items()}
  del sd['layer3.0.conv2.weight']
  sd['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_state_dict(sd, mc, source='x.pth')
  msg = str(e.value)
  assert 'x.pth' in msg and 'layer3.0.conv2.weight' in msg
  assert 'backbone/layer3/0/conv2/kernel' in msg and 'extra.weight' in msg
  # Another class count: every class-sized tensor is named.
  with pytest.raises(
      convert.ConversionError,
      match=r'10 shape-mismatched: '
      r'layer5.conv2d_list.0.bias: file \(5,\).*model \(7,\).*'
      r'class count',
  ):
    convert.convert_state_dict(
        {k: v.numpy() for k, v in _torch_model(mc).state_dict().items()},
        _model_config(classes=7),
    )
  # A TPS checkpoint (layer6 head) into the DA-STC model: a hint.
  tps = {
      k: v.numpy()
      for k, v in _torch_model(_model_config('aspp')).state_dict().items()
  }
  with pytest.raises(convert.ConversionError, match='head=aspp'):
    convert.convert_state_dict(tps, mc)
  params, _, report = convert.convert_state_dict(
      tps, mc, allow_missing=('head/',), allow_unexpected=(r'layer6\.',)
  )
  assert report.missing_initialised[0].startswith('head/')


def test_bad_files_name_the_file(tmp_path):
  mc = _model_config()
  good = str(tmp_path / 'good.pth')
  torch.save(_torch_model(mc).state_dict(), good)
  data = open(good, 'rb').read()
  cut = str(tmp_path / 'cut.pth')
  with open(cut, 'wb') as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(convert.ConversionError, match='cut.pth'):
    convert.load_state_dict(cut)
  with pytest.raises(convert.ConversionError, match='does not exist'):
    convert.load_state_dict(str(tmp_path / 'none.pth'))
  # A pickled object (not a state_dict) is refused without running it.
  evil = str(tmp_path / 'model.pth')
  torch.save(torch.nn.Linear(2, 2), evil)
  with pytest.raises(
      convert.ConversionError, match='model.pth.*not a plain tensor state_dict'
  ) as e:
    convert.load_state_dict(evil)
  assert 'weights_only' not in str(e.value)  # no advice to load it unsafely
  # safetensors (read without torch) gives the same arrays.
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  sd = {k: v.numpy() for k, v in _torch_model(mc).state_dict().items()}
  st = str(tmp_path / 'w.safetensors')
  save_file(sd, st)
  back = convert.load_state_dict(st)
  assert set(back) == set(sd)
  np.testing.assert_array_equal(
      back['layer4.0.conv2.weight'], sd['layer4.0.conv2.weight']
  )
  with open(st, 'r+b') as f:
    f.truncate(os.path.getsize(st) // 2)
  with pytest.raises(convert.ConversionError, match='w.safetensors'):
    convert.load_state_dict(st)
  # DataParallel prefixes and wrappers are removed.
  wrapped = str(tmp_path / 'wrapped.pth')
  torch.save(
      {
          'state_dict': {
              'module.' + k: v for k, v in _torch_model(mc).state_dict().items()
          },
          'epoch': 3,
      },
      wrapped,
  )
  assert 'conv1.weight' in convert.load_state_dict(wrapped)


def _torch_eval(tm, config, data_root):
  """mIoU (%) of the torch model over the target val split, numpy-scored."""
  cs = labels_lib.get_class_set(config.data.class_set)
  ds = pipeline.make_eval_dataset(
      config.data.target_val,
      data_root,
      cs.name,
      config.model.per_axis_flow_scale,
  )
  n = cs.num_classes
  cm = np.zeros((n, n), np.int64)
  for i in range(len(ds)):
    ex = ds[i]
    frames = np.asarray(image_ops.normalize(ex['frames'][None]))
    with torch.no_grad():
      pred, _ = tm(
          _nchw(frames[:, 0]), _nchw(frames[:, 1]), _nchw(ex['flow'][None])
      )
      up = torch.nn.functional.interpolate(
          pred, ex['label'].shape, mode='bilinear', align_corners=True
      )
    ids = up.argmax(1)[0].numpy()
    lab = ex['label'].astype(np.int64)
    ok = lab < n
    cm += np.bincount(lab[ok] * n + ids[ok], minlength=n * n).reshape(n, n)
  iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
  return 100 * float(np.nanmean(iou[list(cs.scored)]))


def test_convert_command_then_eval_matches_pytorch(
    smoke_config, tiny_world, tmp_path
):
  del tiny_world  # evaluation reads the world; it does not generate it
  c = smoke_config
  c.eval.splits = ('target_val',)
  c.eval.num_overlays = 0
  tm = _torch_model(c.model, seed=5)
  src = str(tmp_path / 'accel.pth')
  torch.save(tm.state_dict(), src)
  out = str(tmp_path / 'converted')
  report = convert.convert_file(src, out, c.model)
  assert os.path.isdir(os.path.join(out, 'checkpoints', '0'))
  assert os.path.isfile(os.path.join(out, 'conversion.json'))
  assert not any(
      n.endswith(('.tmp', '.partial')) or '.tmp-' in n
      for n in os.listdir(tmp_path)
  )
  assert len(report.converted) > 50
  with pytest.raises(convert.ConversionError, match='exists'):
    convert.convert_file(src, out, c.model)
  ours = eval_job.evaluate_checkpoint(c, str(tmp_path / 'eval'), out)
  theirs = _torch_eval(tm, c, train.resolve_data_root(c))
  assert abs(ours['target_val'] - theirs) < 1e-3, (ours, theirs)
  assert 0 < theirs < 100
  # The converted weights also start a training run (config.train.init_from).
  c.train.init_from = out
  c.method = 'source_only'
  _, state, _ = state_lib.create_train_state(c)
  state = state_lib.init_from_checkpoint(c, state)
  np.testing.assert_array_equal(
      state.params['backbone']['layer1'][0]['conv2']['kernel'],
      np.transpose(tm.layer1[0].conv2.weight.detach().numpy(), (2, 3, 1, 0)),
  )
  np.testing.assert_array_equal(
      state.batch_stats['backbone']['bn1']['var'], tm.bn1.running_var.numpy()
  )


def _released_keys(head: str, classes: int) -> dict[str, tuple[int, ...]]:
  """Key -> shape of a released full-size checkpoint, from the public model
  source (TPS ``tps/model/accel_deeplabv2.py``; DA-STC
  ``accel_deeplabv2_dsp_cd_DFF_gaijin.py``): written out by hand here, not
  taken from our restatement, so the two are checked against each other."""
  keys = {'conv1.weight': (64, 3, 7, 7)}
  bn = lambda name, n: {
      f'{name}.{p}': (n,)
      for p in ('weight', 'bias', 'running_mean', 'running_var')
  } | {f'{name}.num_batches_tracked': ()}
  keys |= bn('bn1', 64)
  cin = 64
  for layer, (blocks, planes) in enumerate(
      zip((3, 4, 23, 3), (64, 128, 256, 512)), 1
  ):
    for i in range(blocks):
      pre = f'layer{layer}.{i}'
      for j, (o, ci, k) in enumerate(
          ((planes, cin, 1), (planes, planes, 3), (planes * 4, planes, 1)), 1
      ):
        keys[f'{pre}.conv{j}.weight'] = (o, ci, k, k)
        keys |= bn(f'{pre}.bn{j}', o)
      if i == 0:
        keys[f'{pre}.downsample.0.weight'] = (planes * 4, cin, 1, 1)
        keys |= bn(f'{pre}.downsample.1', planes * 4)
      cin = planes * 4
  for i in range(4):
    keys[f'layer5.conv2d_list.{i}.weight'] = (classes, 1024, 3, 3)
    keys[f'layer5.conv2d_list.{i}.bias'] = (classes,)
    if head == 'proda':
      keys[f'layer7.conv2d_list.{i}.weight'] = (256, 2048, 3, 3)
      keys[f'layer7.conv2d_list.{i}.bias'] = (256,)
    else:
      keys[f'layer6.conv2d_list.{i}.weight'] = (classes, 2048, 3, 3)
      keys[f'layer6.conv2d_list.{i}.bias'] = (classes,)
  if head == 'proda':
    keys['layer7.head.1.weight'] = (classes, 256, 1, 1)
  keys['sf_layer.weight'] = (classes, 2 * classes, 1, 1)
  return keys


@pytest.mark.parametrize('head,count', [('proda', 642), ('aspp', 641)])
def test_released_checkpoint_layouts_map_one_to_one(head, count):
  """Every key of a released DA-STC (``layer7``) or TPS (``layer6``) file has
  exactly one parameter of the full-size model, with the same shape."""
  released = _released_keys(head, 15)
  assert len(released) == count  # 538 / 537 without num_batches_tracked
  mc = viper.get_config().model
  mc.head = head
  abstract = nnx.eval_shape(lambda: models.build_model(mc, nnx.Rngs(params=0)))
  _, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  ours = {}
  for tree in (params, stats):
    for path, leaf in nnx.to_flat_state(tree):
      name = convert.torch_name('/'.join(map(str, path)), head)
      shape = tuple(leaf.get_value().shape)
      if len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
      ours[name] = shape
  counted = {
      k: v for k, v in released.items() if not k.endswith('num_batches_tracked')
  }
  assert ours == counted


def test_classifier_named_as_in_our_earlier_restatement_still_converts():
  mc = _model_config()
  sd = {k: v.numpy() for k, v in _torch_model(mc).state_dict().items()}
  sd['layer7.classifier.weight'] = sd.pop('layer7.head.1.weight')
  params, _, report = convert.convert_state_dict(sd, mc)
  assert 'Read layer7.classifier.weight as layer7.head.1.weight.' in (
      report.notes
  )
  np.testing.assert_array_equal(
      params['head']['classifier']['kernel'][0, 0],
      sd['layer7.classifier.weight'][:, :, 0, 0].T,
  )
