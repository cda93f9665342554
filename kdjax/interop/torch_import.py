"""Import torchvision / timm ResNet and VGG-BN weights into kdjax models, and save them as a teacher run.

A distillation experiment usually wants a strong teacher, and the cheapest strong ones are published PyTorch
checkpoints. kdjax's ResNets and VGGs were built to line up with torchvision (same stages, PyTorch's explicit `k // 2`
padding, BatchNorm epsilon 1e-5, parameter names that follow torchvision's), so an import is a rename table plus two
layout changes:

* conv `weight` OIHW -> `kernel` HWIO; linear `weight` (out, in) -> `kernel` (in, out); biases as they are;
* BatchNorm `weight`, `bias`, `running_mean`, `running_var` -> `scale`, `bias`, `mean`, `var`
  (`num_batches_tracked` is a training counter with no counterpart, so it is dropped).

timm: timm's plain `resnet18`, `resnet34` and `resnet50` name their parameters exactly as torchvision does (`conv1`,
`bn1`, `layerK.J.convN` / `bnN`, `layerK.J.downsample.0` / `.1`, `fc`; its activation, pooling and drop layers hold no
parameters), and timm's `vgg16_bn` / `vgg19_bn` share torchvision's `features.N`. So both sources go through the same
tables and there is no `source=` switch. timm's other variants (`resnet50d`'s deep stem `conv1.0`, average-pool
shortcuts `downsample.1` / `.2`, ...) are different architectures and fail the key check with the keys listed.

VGG's classifier: torchvision's (and timm's `pre_logits` + `head`) is a 4096-4096 MLP over a 7x7 map, while kdjax's
VGG head is global-average-pool + Linear(512, classes) (see `kdjax/models/vgg.py`). No mapping between them keeps
the logits, so a VGG import needs `fresh_head=True` (CLI `--fresh-head`): the conv/BN features are imported, the
source classifier is dropped and the head stays freshly initialised, and `save_as_teacher_run` records
`"head": "fresh"`. Such a teacher serves feature losses, or logit losses once its head has been fine-tuned; refusing
by default keeps anyone from distilling random logits by accident. `fresh_head=True` works for ResNets too, to reuse
an ImageNet backbone under a head with another number of classes.

CLI: `python -m kdjax.interop.torch_import MODEL_NAME STATE_DICT.pth WORKDIR [--num-classes N] [--fresh-head]
[--mean M M M --std S S S]` (the input normalisation the weights were trained with; ImageNet's by default).
Torch is imported only where a torch file or module is read (`pip install 'kdjax[torch]'`); converting a state_dict of
numpy arrays needs no torch.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kdjax import export
from kdjax.errors import UserError
from kdjax.models import create_model
from kdjax.models.vgg import VGG_CONFIGS

# Per kind of kdjax layer: its variable -> (the PyTorch parameter/buffer name, axes that permute the PyTorch array into
# kdjax's layout, None when the layouts agree). Permutations rather than functions, so the PyTorch shape a model
# expects can be derived for error messages.
LEAVES: dict[type, dict[str, tuple[str, tuple[int, ...] | None]]] = {
  nnx.Conv: {'kernel': ('weight', (2, 3, 1, 0)), 'bias': ('bias', None)},  # OIHW -> HWIO
  nnx.Linear: {'kernel': ('weight', (1, 0)), 'bias': ('bias', None)},  # (out, in) -> (in, out)
  nnx.BatchNorm: {
    'scale': ('weight', None), 'bias': ('bias', None), 'mean': ('running_mean', None), 'var': ('running_var', None),
  },
}

# PyTorch keys with no kdjax counterpart that every checkpoint may carry.
IGNORED_SUFFIXES = ('.num_batches_tracked',)

# Wrappers around a state_dict in training checkpoints ({'state_dict': ..., 'optimizer': ..., 'epoch': ...}), and
# key prefixes added by DistributedDataParallel ('module.') and torch.compile ('_orig_mod.').
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model')
KEY_PREFIXES = ('module.', '_orig_mod.')

Rule = tuple[str, str | Callable[[re.Match], str]]


@dataclasses.dataclass(frozen=True)
class Family:
  """How the layers of one architecture family are named in PyTorch.

  backbone, head: (regex over the '/'-joined kdjax module path, PyTorch module name) rules, tried in order; the name
    is a `re` template or a function of the match. `head` is empty where the source head has no kdjax counterpart.
  classifier: key prefixes of the source's classifier, dropped when the head is not imported.
  classes_keys: keys whose first dimension is the source's class count (the `num_classes` default).
  """
  backbone: tuple[Rule, ...]
  head: tuple[Rule, ...]
  classifier: tuple[str, ...]
  classes_keys: tuple[str, ...]


# torchvision's ResNet: kdjax stage 0 is the stem (conv1, bn1), stages 1..4 are layer1..layer4, and the block layer
# names are torchvision's. Basic blocks (conv1/2) and v1.5 bottlenecks (conv1/2/3) share the table, since a block
# name means the same in both; the shape check tells the two apart.
RESNET = Family(
  backbone=(
    (r'stages/0/conv', 'conv1'),
    (r'stages/0/bn', 'bn1'),
    (r'stages/(\d+)/blocks/(\d+)/downsample_conv', r'layer\1.\2.downsample.0'),
    (r'stages/(\d+)/blocks/(\d+)/downsample_bn', r'layer\1.\2.downsample.1'),
    (r'stages/(\d+)/blocks/(\d+)/(conv[123]|bn[123])', r'layer\1.\2.\3'),
  ),
  head=((r'head/fc', 'fc'),),
  classifier=('fc.',),
  classes_keys=('fc.weight',),
)

# Position of a conv-BN-ReLU unit's layers in torchvision's `features` Sequential (the ReLU, at +2, has no weights).
_VGG_UNIT_OFFSETS = {'conv': 0, 'bn': 1}


def _vgg_family(config: str) -> Family:
  """torchvision's VGG-BN `features`: three modules per conv (conv, BN, ReLU) and a max-pool closing each stage."""
  stage_starts = np.cumsum([0] + [3 * len(widths) + 1 for widths in VGG_CONFIGS[config]])

  def features_name(match: re.Match) -> str:
    stage, unit, layer = int(match[1]), int(match[2]), match[3]
    return f'features.{stage_starts[stage] + 3 * unit + _VGG_UNIT_OFFSETS[layer]}'

  return Family(
    backbone=((r'stages/(\d+)/layers/(\d+)/(conv|bn)', features_name),),
    head=(),
    classifier=('classifier.', 'pre_logits.', 'head.'),  # torchvision's; timm's
    classes_keys=('classifier.6.weight', 'head.fc.weight'),
  )


# kdjax model name -> how its torchvision/timm counterpart names its parameters. The `_cifar` ResNets take the usual
# CIFAR adaptation of a torchvision ResNet (conv1 replaced by a 3x3/1 conv, maxpool removed): the names are unchanged.
FAMILIES: dict[str, Family] = {
  'resnet18': RESNET,
  'resnet34': RESNET,
  'resnet50': RESNET,
  'resnet18_cifar': RESNET,
  'resnet34_cifar': RESNET,
  'vgg16_bn': _vgg_family('D'),
  'vgg19_bn': _vgg_family('E'),
}


def _family(model_name: str) -> Family:
  if model_name not in FAMILIES:
    raise UserError(f"no PyTorch import for model {model_name!r}; choose one of: {', '.join(FAMILIES)}")
  return FAMILIES[model_name]


def _torch_name(path: str, rules: tuple[Rule, ...]) -> str | None:
  for pattern, name in rules:
    match = re.fullmatch(pattern, path)
    if match:
      return name(match) if callable(name) else match.expand(name)
  return None


def _expected_keys(model: nnx.Module, rules: tuple[Rule, ...]) -> dict[str, tuple[nnx.Variable, tuple | None]]:
  """PyTorch key -> (the kdjax variable it fills, axes permutation), for every layer a rule names.

  A layer no rule names keeps its initial values; only the head may be such a layer, so an unnamed backbone layer
  means the tables and the architecture files have drifted apart, which is a bug here, not a user mistake.
  """
  expected = {}
  for path, module in nnx.iter_modules(model):
    leaves = LEAVES.get(type(module))
    if leaves is None:
      continue
    path = '/'.join(str(part) for part in path)
    name = _torch_name(path, rules)
    if name is None:
      if not path.startswith('head/'):
        raise ValueError(f'no PyTorch name for kdjax layer {path}; update FAMILIES in {__name__}')
      continue
    for ours, (theirs, axes) in leaves.items():
      variable = getattr(module, ours, None)
      if isinstance(variable, nnx.Variable):
        expected[f'{name}.{theirs}'] = (variable, axes)
  return expected


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy copy of a torch tensor or array-like; torch is duck-typed so numpy-only callers need no torch."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16; the kdjax parameters are float32 anyway
    value = value.numpy()
  # A copy, not a view: the kdjax arrays built from it must not change when the torch module trains or is edited.
  return np.array(value, copy=True)


def _strip_prefixes(key: str) -> str:
  while key.startswith(KEY_PREFIXES):
    key = key.split('.', 1)[1]
  return key


def _ignored(key: str, dropped: tuple[str, ...]) -> bool:
  """Keys a conversion may leave unused: counters every checkpoint carries, and a classifier not being imported."""
  return key.endswith(IGNORED_SUFFIXES) or (bool(dropped) and key.startswith(dropped))


def _listing(keys: list[str], limit: int = 4) -> str:
  return ', '.join(keys[:limit]) + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def _source_shape(kdjax_shape: tuple[int, ...], axes: tuple[int, ...] | None) -> tuple[int, ...]:
  """The PyTorch shape that becomes `kdjax_shape` under `np.transpose(_, axes)`."""
  return tuple(kdjax_shape) if axes is None else tuple(kdjax_shape[i] for i in np.argsort(axes))


def _default_num_classes(family: Family, state_dict: Mapping[str, Any]) -> int | None:
  """The source classifier's row count, None when the state_dict has no classifier."""
  return next((int(tuple(state_dict[key].shape)[0]) for key in family.classes_keys if key in state_dict), None)


def _check_names(model_name: str, model: nnx.Module, family: Family, state_dict: Mapping[str, Any],
                 import_head: bool) -> dict:
  """The model's {PyTorch name: (variable, axes)}, once the state_dict has exactly those names (else UserError)."""
  expected = _expected_keys(model, family.backbone + (family.head if import_head else ()))
  dropped = () if import_head else family.classifier
  missing = [key for key in expected if key not in state_dict]
  unexpected = [key for key in state_dict if key not in expected and not _ignored(key, dropped)]
  if missing or unexpected:
    found = '; '.join(f'{what} {_listing(keys)}' for what, keys in (('missing', missing), ('unexpected', unexpected))
                      if keys)
    raise UserError(f'the state_dict does not have the parameter names of a torchvision/timm {model_name} ({found}); '
                    f"pass the model it was trained as (one of: {', '.join(FAMILIES)})")
  return expected


def convert_state_dict(
  model_name: str,
  state_dict: Mapping[str, Any],
  *,
  num_classes: int | None = None,
  image_shape: tuple[int, int, int] = (224, 224, 3),
  fresh_head: bool = False,
) -> nnx.Module:
  """The kdjax model `model_name` holding the weights of a torchvision/timm-layout `state_dict`.

  `state_dict` maps PyTorch names to torch tensors or numpy arrays ('module.' / '_orig_mod.' prefixes are removed).
  `num_classes` defaults to the source classifier's row count. `image_shape` only builds the model: parameter shapes
  do not depend on H and W, but C must match the first conv. `fresh_head=True` imports everything but the classifier
  (required for VGG, see the module docstring). Every key is checked before anything is copied: missing or unexpected
  keys, then shapes, each raising `UserError` with the first offenders, so a wrong architecture or class count
  never yields a half-converted model.
  """
  family = _family(model_name)
  if not family.head and not fresh_head:
    raise UserError(f"{model_name}'s PyTorch classifier (a 4096-4096 MLP over a 7x7 map) has no counterpart in "
                    f"kdjax's {model_name} head (global-avg-pool + Linear(512, classes)); pass fresh_head=True "
                    '(CLI --fresh-head) to import the conv/BN features and train a new head')
  state_dict = {_strip_prefixes(key): value for key, value in state_dict.items()}
  import_head = bool(family.head) and not fresh_head
  source_classes = _default_num_classes(family, state_dict)
  if num_classes is None and source_classes is None:
    # Another architecture's state_dict has no such classifier either: say that, not that a class count is missing.
    _check_names(model_name, create_model(model_name, num_classes=1, image_shape=tuple(image_shape),
                                          rngs=nnx.Rngs(0)), family, state_dict, import_head)
    raise UserError(f'the state_dict has no classifier ({" or ".join(family.classes_keys)}) to take the class '
                    f'count from; pass num_classes (CLI --num-classes) for {model_name}')
  num_classes = source_classes if num_classes is None else num_classes
  model = create_model(model_name, num_classes=num_classes, image_shape=tuple(image_shape), rngs=nnx.Rngs(0))
  expected = _check_names(model_name, model, family, state_dict, import_head)

  arrays, mismatches, class_rows_only = {}, {}, True
  for key, (variable, axes) in expected.items():
    array = _to_numpy(state_dict[key])
    wanted = _source_shape(variable.shape, axes)
    if array.shape != wanted:
      mismatches[key] = f'{key} is {array.shape} in the state_dict but {model_name} needs {wanted}'
      class_rows_only &= key.startswith(family.classifier) and array.shape[1:] == wanted[1:]
    else:
      arrays[key] = array if axes is None else np.transpose(array, axes)
  if mismatches:
    if import_head and class_rows_only:  # the classifier differs in its class count alone
      fix = (f'pass num_classes={source_classes} (the checkpoint\'s class count), or fresh_head=True (CLI '
             '--fresh-head) to import the backbone under a new head')
    else:
      fix = (f"pass the model it was trained as (one of: {', '.join(FAMILIES)}); convert_state_dict's image_shape "
             'gives the input channels')
    raise UserError(f'the state_dict does not fit {model_name} with num_classes={num_classes}: '
                    f'{"; ".join(list(mismatches.values())[:3])}{" ..." if len(mismatches) > 3 else ""} '
                    f'({len(mismatches)} mismatches); {fix}')

  for key, (variable, _) in expected.items():
    variable.set_value(jnp.asarray(arrays[key], dtype=variable.dtype))
  return model


def _import_torch():
  try:
    import torch
  except ImportError:
    raise UserError("reading PyTorch files and modules needs torch; install it with pip install 'kdjax[torch]' "
                    '(a CPU build is enough)') from None
  return torch


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The state_dict in a `.pth` / `.pt` file, as numpy arrays with 'module.' / '_orig_mod.' prefixes removed.

  Loaded with `weights_only=True`: a checkpoint is untrusted input and full unpickling can run arbitrary code. Training
  checkpoints that wrap the weights (`{'state_dict': ...}`, `{'model': ...}`, `{'model_state_dict': ...}`) are
  unwrapped.
  """
  torch = _import_torch()
  if not os.path.isfile(path):
    raise UserError(f'PyTorch checkpoint {path} does not exist; pass the path of a .pth/.pt state_dict file')
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for unreadable or non-tensor content
    summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(f'cannot read {path} as a PyTorch state_dict ({summary}); re-save it with '
                    'torch.save(model.state_dict(), path), or convert the live model with from_torch_module') from None
  while isinstance(loaded, Mapping):
    inner = next((loaded[key] for key in WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), None)
    if inner is None:
      break
    loaded = inner
  if not isinstance(loaded, Mapping):
    raise UserError(f'{path} holds a {type(loaded).__name__}, not a state_dict; re-save it with '
                    'torch.save(model.state_dict(), path)')
  return {_strip_prefixes(key): _to_numpy(value) for key, value in loaded.items()}


def from_torch_module(model_name: str, torch_module: Any, **kwargs) -> nnx.Module:
  """`convert_state_dict` on a live `torch.nn.Module` (e.g. `torchvision.models.resnet50(weights=...)`)."""
  if not callable(getattr(torch_module, 'state_dict', None)):
    raise UserError(f'expected a torch.nn.Module, got {type(torch_module).__name__}; pass the model object, or use '
                    'convert_state_dict for a state_dict')
  return convert_state_dict(model_name, torch_module.state_dict(), **kwargs)


def save_as_teacher_run(
  module: nnx.Module,
  workdir: str,
  *,
  model_name: str,
  source: str | None = None,
  fresh_head: bool = False,
  normalization: dict | None = None,
) -> str:
  """Writes `module` as a finished run in `workdir`, so a KD run can name it as `teacher.workdir`; returns the path.

  The checkpoint is laid out as `kdjax.checkpoint` writes a run's best one (`WORKDIR/best/0`, items `state` with
  `params` and `model_state`, and `meta`), which is what `restore_model_variables` reads. `config.json` records where
  the weights came from, the model name and class count the KD config must use, whether the head is untrained, and
  the input normalisation the weights expect (ImageNet's unless given), which a KD run maps its inputs to (see
  `kdjax.teachers`). An existing run in `workdir` is refused rather than mixed with the import.
  """
  if any(os.path.exists(os.path.join(workdir, name)) for name in ('best', 'checkpoints', 'config.json')):
    raise UserError(f'{workdir} already holds a run; pass a new or empty workdir for the imported teacher')
  _, params, rest = nnx.split(module, nnx.Param, ...)
  num_classes = int(module.head.fc.kernel.shape[-1])
  head = 'fresh: randomly initialised, fine-tune it before distilling logits' if fresh_head else 'imported'
  info = dict(imported_from=source, format='torchvision/timm state_dict', teacher=dict(name=model_name),
              num_classes=num_classes, head=head, checkpoint='best/0',
              normalization={k: list(v) for k, v in (normalization or export.IMAGENET_NORMALIZATION).items()})
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'best')),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  try:
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params, 'model_state': rest}),
                                            meta=ocp.args.JsonSave(info)))
    manager.wait_until_finished()
  finally:
    manager.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return workdir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m kdjax.interop.torch_import',
    description='Convert a torchvision/timm state_dict into a kdjax teacher run (WORKDIR/best/0 + config.json).')
  parser.add_argument('model', help=f"kdjax model name: {', '.join(FAMILIES)}")
  parser.add_argument('checkpoint', help='a .pth/.pt file holding a state_dict')
  parser.add_argument('workdir', help='the new teacher run directory (must not hold a run)')
  parser.add_argument('--num-classes', type=int, default=None, help="default: the checkpoint's classifier rows")
  parser.add_argument('--fresh-head', action='store_true',
                      help='import everything but the classifier and leave a new head (required for VGG)')
  parser.add_argument('--mean', type=float, nargs='+', default=None,
                      help="per-channel input mean the weights were trained with, on [0, 1] pixels (default "
                           "ImageNet's 0.485 0.456 0.406)")
  parser.add_argument('--std', type=float, nargs='+', default=None, help="per-channel input std (default ImageNet's)")
  args = parser.parse_args(argv)
  if (args.mean is None) != (args.std is None) or (args.mean and len(args.mean) != len(args.std)):
    parser.error('give --mean and --std together, one value per channel each')
  try:
    state_dict = load_torch_checkpoint(args.checkpoint)
    model = convert_state_dict(args.model, state_dict, num_classes=args.num_classes, fresh_head=args.fresh_head)
    save_as_teacher_run(model, args.workdir, model_name=args.model, source=os.path.abspath(args.checkpoint),
                        fresh_head=args.fresh_head,
                        normalization=dict(mean=args.mean, std=args.std) if args.mean else None)
  except UserError as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 2
  num_classes = int(model.head.fc.kernel.shape[-1])
  print(f'wrote {args.model} ({num_classes} classes{", untrained head" if args.fresh_head else ""}) to '
        f'{args.workdir}; distil from it with --config.teacher.workdir={args.workdir} '
        f'--config.teacher.name={args.model} on a dataset with {num_classes} classes')
  return 0


if __name__ == '__main__':
  sys.exit(main())
