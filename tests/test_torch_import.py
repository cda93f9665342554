"""Tests for `kdjax.interop.torch_import`: PyTorch weights in, the same function out, and a teacher run on disk.

The reference networks are torchvision's own when torchvision is importable. Otherwise `_TorchResNet` and `_TorchVGG`
below stand in: plain `torch.nn` mirrors of torchvision's ResNet (BasicBlock / v1.5 Bottleneck, `conv1`, `bn1`,
`layer1..4`, `downsample.0/.1`, `fc`) and VGG-BN (`features.N`, `avgpool`, `classifier.0/3/6`) that reproduce its
module structure and state_dict names, so the converter is held to the layout real checkpoints have. Weights are
random and BatchNorm statistics are set to random non-trivial values (eval mode), so a wrong transpose, a swapped
mean/var or a padding difference shows up in the outputs. Inputs are 2 x 64 x 64 to keep CPU time small.
"""

import copy
import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
nn = torch.nn

from kdjax import export  # noqa: E402
from kdjax.checkpoint import restore_model_variables  # noqa: E402
from kdjax.errors import UserError  # noqa: E402
from kdjax.interop import torch_import  # noqa: E402
from kdjax.interop.torch_import import (  # noqa: E402
  convert_state_dict, from_torch_module, load_torch_checkpoint, save_as_teacher_run)
from kdjax.models import create_model  # noqa: E402

try:
  import torchvision
except ImportError:  # the usual case here: torchvision's wheels do not fit the on-disk torch
  torchvision = None

NUM_CLASSES = 10
TOLERANCE = 1e-4  # max |kdjax - torch| / max |torch|


class _TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: the stride sits on the 3x3
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchResNet(nn.Module):
  """torchvision.models.ResNet's structure and parameter names (no groups/dilation options)."""

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0], 1)
    self.layer2 = self._make_layer(block, 128, layers[1], 2)
    self.layer3 = self._make_layer(block, 256, layers[2], 2)
    self.layer4 = self._make_layer(block, 512, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG16 = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']


class _TorchVGG(nn.Module):
  """torchvision.models.VGG with batch norm: `features` Sequential, 7x7 adaptive pool, 4096-4096 classifier."""

  def __init__(self, config, num_classes=1000):
    super().__init__()
    layers, in_ch = [], 3
    for v in config:
      if v == 'M':
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_ch = v
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                    nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _cifar(net):
  """The usual CIFAR adaptation of a torchvision ResNet, which kdjax's `*_cifar` ResNets mirror."""
  net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
  net.maxpool = nn.Identity()
  return net


if torchvision is not None:
  _tv = torchvision.models
  REFERENCES = {
    'resnet18': lambda: _tv.resnet18(num_classes=NUM_CLASSES),
    'resnet34': lambda: _tv.resnet34(num_classes=NUM_CLASSES),
    'resnet50': lambda: _tv.resnet50(num_classes=NUM_CLASSES),
    'resnet18_cifar': lambda: _cifar(_tv.resnet18(num_classes=NUM_CLASSES)),
    'vgg16_bn': lambda: _tv.vgg16_bn(num_classes=NUM_CLASSES),
  }
else:
  REFERENCES = {
    'resnet18': lambda: _TorchResNet(_TorchBasicBlock, [2, 2, 2, 2], NUM_CLASSES),
    'resnet34': lambda: _TorchResNet(_TorchBasicBlock, [3, 4, 6, 3], NUM_CLASSES),
    'resnet50': lambda: _TorchResNet(_TorchBottleneck, [3, 4, 6, 3], NUM_CLASSES),
    'resnet18_cifar': lambda: _cifar(_TorchResNet(_TorchBasicBlock, [2, 2, 2, 2], NUM_CLASSES)),
    'vgg16_bn': lambda: _TorchVGG(_VGG16, NUM_CLASSES),
  }

IMAGE_SIZE = {'resnet18_cifar': 32}


@functools.cache
def _torch_net(name):
  """A reference network with random weights and random BatchNorm statistics, in eval mode. Cached and shared by
  the tests of a process: a test that edits it edits a copy."""
  torch.manual_seed(0)
  net = REFERENCES[name]()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return net.eval()


@functools.cache
def _images(size):
  return np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)


def _torch_stage_outputs(name, net, x):
  """Each stage's output, where kdjax takes its features: ResNet stem (its ReLU, before the max-pool) and layer1..4,
  VGG pools."""
  if name.startswith('vgg'):
    outputs = []
    for layer in net.features:
      x = layer(x)
      if isinstance(layer, nn.MaxPool2d):
        outputs.append(x)
    return outputs
  x = net.relu(net.bn1(net.conv1(x)))
  outputs = [x]
  x = net.maxpool(x)
  for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
    x = stage(x)
    outputs.append(x)
  return outputs


def _run_both(name, model):
  size = IMAGE_SIZE.get(name, 64)
  x = _images(size)
  net = _torch_net(name)
  with torch.no_grad():
    ref_logits = net(torch.from_numpy(x)).numpy()
    ref_stages = [t.permute(0, 2, 3, 1).numpy() for t in _torch_stage_outputs(name, net, torch.from_numpy(x))]
  logits, features = model(jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
  return (ref_logits, ref_stages), (np.asarray(logits), [np.asarray(f) for f in features])


def _relative(ours, ref):
  assert ours.shape == ref.shape
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet50', 'resnet18_cifar'])
def test_resnet_matches_torch(name):
  model = from_torch_module(name, _torch_net(name))  # num_classes from fc.weight
  (ref_logits, ref_stages), (logits, features) = _run_both(name, model)
  stage_errors = [_relative(f, r) for f, r in zip(features, ref_stages, strict=True)]
  logit_error = _relative(logits, ref_logits)
  print(f'{name}: logits rel diff {logit_error:.2e}, stages {", ".join(f"{e:.1e}" for e in stage_errors)}')
  assert logit_error <= TOLERANCE
  assert max(stage_errors) <= TOLERANCE


def test_vgg_features_match_torch_and_head_stays_fresh():
  net = _torch_net('vgg16_bn')
  with pytest.raises(UserError, match='fresh_head=True'):
    from_torch_module('vgg16_bn', net)
  model = from_torch_module('vgg16_bn', net, fresh_head=True)
  (_, ref_stages), (logits, features) = _run_both('vgg16_bn', model)
  stage_errors = [_relative(f, r) for f, r in zip(features, ref_stages, strict=True)]
  print(f'vgg16_bn: stages {", ".join(f"{e:.1e}" for e in stage_errors)}')
  assert max(stage_errors) <= TOLERANCE
  # num_classes came from classifier.6, and the head is exactly a freshly built model's.
  assert logits.shape == (2, NUM_CLASSES)
  fresh = create_model('vgg16_bn', num_classes=NUM_CLASSES, image_shape=(224, 224, 3), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.head.fc.kernel.get_value(), fresh.head.fc.kernel.get_value())


def test_accepts_numpy_and_drops_batch_counters():
  state = {k: v.numpy() for k, v in _torch_net('resnet18').state_dict().items()}
  assert any(k.endswith('num_batches_tracked') for k in state)
  model = convert_state_dict('resnet18', state, image_shape=(64, 64, 3))
  np.testing.assert_array_equal(model.head.fc.kernel.get_value(), state['fc.weight'].T)
  np.testing.assert_array_equal(model.stages[1].blocks[0].conv1.kernel.get_value(),
                                state['layer1.0.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.stages[4].blocks[0].downsample_bn.var.get_value(),
                                state['layer4.0.downsample.1.running_var'])


def test_imported_arrays_do_not_share_memory_with_the_torch_module():
  """Editing or training the torch module after the import leaves the kdjax model as imported."""
  net = copy.deepcopy(_torch_net('resnet18'))  # its own: the cached one is shared by the other tests
  model = from_torch_module('resnet18', net)
  bias, mean = np.array(model.head.fc.bias.get_value()), np.array(model.stages[0].bn.mean.get_value())
  with torch.no_grad():
    net.fc.bias.add_(100.0)
    net.bn1.running_mean.add_(100.0)
  np.testing.assert_array_equal(model.head.fc.bias.get_value(), bias)
  np.testing.assert_array_equal(model.stages[0].bn.mean.get_value(), mean)


def test_wrong_class_count_names_both_shapes_and_the_fix():
  net = _torch_net('resnet18')
  with pytest.raises(UserError, match=r'fc\.weight is \(10, 512\) .* needs \(5, 512\).*num_classes=10'):
    from_torch_module('resnet18', net, num_classes=5)
  # The fix it names: keep the backbone, start a new 5-class head.
  model = from_torch_module('resnet18', net, num_classes=5, fresh_head=True)
  assert model.head.fc.kernel.get_value().shape == (512, 5)
  np.testing.assert_array_equal(model.stages[0].conv.kernel.get_value(),
                                net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_wrong_architecture_lists_keys():
  state = _torch_net('resnet18').state_dict()
  with pytest.raises(UserError, match=r'missing layer1\.2\.'):
    convert_state_dict('resnet34', state)
  with pytest.raises(UserError, match=r'\(unexpected extra\.weight\)'):
    convert_state_dict('resnet18', {**state, 'extra.weight': state['fc.weight']})
  with pytest.raises(UserError, match=r'missing layer1\.0\.bn3\.weight'):  # basic-block weights into a bottleneck net
    convert_state_dict('resnet50', state)
  # timm's deep-stem variants (resnet50d & co.) are other architectures; their stem keys are listed.
  deep = {('conv1.0.weight' if k == 'conv1.weight' else k): v for k, v in state.items()}
  with pytest.raises(UserError, match=r'missing conv1\.weight; unexpected conv1\.0\.weight'):
    convert_state_dict('resnet18', deep)
  with pytest.raises(UserError, match='choose one of'):
    convert_state_dict('cnn2', state)
  # A ResNet state_dict named as a VGG has no VGG classifier either: the names are the problem, not a class count.
  with pytest.raises(UserError, match=r'parameter names of a torchvision/timm vgg16_bn \(missing features\.'):
    convert_state_dict('vgg16_bn', state, fresh_head=True)
  # A classifier of another width (another architecture's features) is not a class-count problem.
  narrow = {**state, 'fc.weight': state['fc.weight'][:, :256]}
  with pytest.raises(UserError, match=r"fc\.weight is \(10, 256\).*needs \(10, 512\).*pass the model it was "
                                      r"trained as") as error:
    convert_state_dict('resnet18', narrow)
  assert 'num_classes=' not in str(error.value).split(';')[-1]


def test_load_torch_checkpoint_unwraps_and_strips_prefixes(tmp_path):
  net = _torch_net('resnet18')
  wrapped = tmp_path / 'train.pth'
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}}, wrapped)
  state = load_torch_checkpoint(str(wrapped))
  assert list(state) == list(net.state_dict())
  np.testing.assert_array_equal(state['fc.weight'], net.fc.weight.detach().numpy())

  pickled = tmp_path / 'whole_model.pth'
  torch.save(net, pickled)  # a pickled module, which weights_only loading refuses
  with pytest.raises(UserError, match=r'state_dict\(\)'):
    load_torch_checkpoint(str(pickled))
  with pytest.raises(UserError, match='does not exist'):
    load_torch_checkpoint(str(tmp_path / 'nope.pth'))


def test_save_as_teacher_run_round_trip(tmp_path):
  model = from_torch_module('resnet18', _torch_net('resnet18'))
  workdir = str(tmp_path / 'teacher')
  save_as_teacher_run(model, workdir, model_name='resnet18', source='test')
  with open(os.path.join(workdir, 'config.json')) as f:
    info = json.load(f)
  assert info['teacher']['name'] == 'resnet18' and info['num_classes'] == NUM_CLASSES and info['head'] == 'imported'
  assert info['normalization'] == dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # ImageNet's
  assert export.recorded_normalization(workdir) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

  # What kdjax.train.load_teacher does: a fresh model (other seed, other image size), filled from the run.
  fresh = create_model('resnet18', num_classes=NUM_CLASSES, image_shape=(32, 32, 3), rngs=nnx.Rngs(1))
  graphdef, variables = nnx.split(fresh)
  restored = nnx.merge(graphdef, restore_model_variables(workdir, variables))
  x = jnp.asarray(_images(64).transpose(0, 2, 3, 1))
  ours, theirs = restored(x, train=False), model(x, train=False)
  np.testing.assert_array_equal(ours[0], theirs[0])
  for a, b in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_array_equal(a, b)

  with pytest.raises(UserError, match='already holds a run'):
    save_as_teacher_run(model, workdir, model_name='resnet18')


def test_cli(tmp_path, capsys):
  path = tmp_path / 'resnet18.pth'
  torch.save(_torch_net('resnet18').state_dict(), path)
  workdir = str(tmp_path / 'run')
  assert torch_import.main(['resnet18', str(path), workdir]) == 0
  assert f'--config.teacher.workdir={workdir}' in capsys.readouterr().out
  assert os.path.isdir(os.path.join(workdir, 'best', '0'))

  assert torch_import.main(['resnet18', str(path), str(tmp_path / 'other'), '--num-classes', '3']) == 2
  assert 'num_classes=10' in capsys.readouterr().err
  own = str(tmp_path / 'own_statistics')
  assert torch_import.main(['resnet18', str(path), own, '--mean', '0.5', '0.5', '0.5', '--std', '0.2', '0.2', '0.2']) == 0
  assert export.recorded_normalization(own) == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
  # An import written before imports recorded their statistics: ImageNet's, the only ones the importer assumed.
  with open(os.path.join(workdir, 'config.json')) as f:
    info = json.load(f)
  del info['normalization']
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(info, f)
  assert export.recorded_normalization(workdir) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
