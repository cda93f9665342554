"""A trained model as a self-contained artifact, and the plain predictor that loads it.

`export_run(workdir)` writes `WORKDIR/export/`: `model.json` (architecture, classes, input size, normalisation) and
`params.msgpack` (parameters and BatchNorm statistics). `Predictor.load(path)` needs only that folder,
`kdjax.models` and the image decoder of `kdjax.data` -- no config schema, optimizer or checkpoint code -- and also
reads a run's workdir directly (its best checkpoint), which is what `--mode=eval` and `--mode=predict` use.
"""
import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization, traverse_util
from PIL import Image

from kdjax import plugins
from kdjax.data import images as decoding
from kdjax.errors import UserError
from kdjax.models import create_model

DATA_FILE = 'data.json'   # written by every training run: class names, image shape, normalisation


@dataclasses.dataclass
class Predictor:
  """Class probabilities for uint8 images (N, H, W, C) or image files."""
  spec: dict
  model: nnx.Module

  @classmethod
  def load(cls, path: str) -> 'Predictor':
    """From an export folder, or from a run's workdir (its best checkpoint, else the latest)."""
    if os.path.exists(os.path.join(path, 'params.msgpack')):
      return cls._from_export(path)
    return cls._from_run(path)

  @classmethod
  def _from_export(cls, folder: str) -> 'Predictor':
    """The model of an export folder; a damaged or mismatched folder is a UserError naming what is wrong."""
    redo = f'export the run again (--mode=export --workdir RUN) to replace {folder}'
    try:
      with open(os.path.join(folder, 'model.json')) as f:
        spec = json.load(f)
      model = _build(spec)
      with open(os.path.join(folder, 'params.msgpack'), 'rb') as f:
        pure = serialization.msgpack_restore(f.read())
    except (OSError, ValueError, KeyError, TypeError) as error:  # msgpack's errors are ValueErrors
      raise UserError(f'cannot read the export in {folder} ({type(error).__name__}: {error}); {redo}') from None
    variables = nnx.state(model, (nnx.Param, nnx.BatchStat))
    expected = {tuple(map(str, path)): leaf.shape for path, leaf in nnx.to_flat_state(variables)}
    try:
      found = {tuple(map(str, path)): np.shape(leaf) for path, leaf in traverse_util.flatten_dict(pure).items()}
    except AttributeError:  # not a nested dict of arrays
      found = {}
    mismatched = sorted(set(expected) ^ set(found)) + sorted(p for p in set(expected) & set(found)
                                                            if expected[p] != found[p])
    if mismatched:
      listing = ', '.join('/'.join(p) + (f' {found[p]} vs {expected[p]}' if p in expected and p in found
                                                   else '') for p in mismatched[:3])
      raise UserError(f'{folder}/params.msgpack does not fit the {spec["model"]} with {len(spec["class_names"])} '
                      f'classes that model.json describes ({len(mismatched)} arrays differ: {listing}); {redo}')
    nnx.replace_by_pure_dict(variables, pure)
    nnx.update(model, variables)
    return cls(spec, model)

  @classmethod
  def _from_run(cls, workdir: str) -> 'Predictor':
    from kdjax import checkpoint  # only when reading a training run, not an export
    spec = run_spec(workdir)
    model = _build(spec)
    graphdef, variables = nnx.split(model)
    variables = checkpoint.restore_model_variables(workdir, variables, role='run')
    return cls(spec, nnx.merge(graphdef, variables))

  def __post_init__(self):
    self._forward = jax.jit(self._logits)

  def normalize(self, images):
    """uint8 images -> the model's input, as in training (the run's channel mean and std)."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(self.spec['mean'])) / jnp.asarray(self.spec['std'])

  def _logits(self, images):
    size = self.spec['image_shape'][0]
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, images.shape[3]),
                                'bilinear')
    logits, _ = self.model(self.normalize(images), train=False)
    return logits.astype(jnp.float32)

  def predict_logits(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._forward(jnp.asarray(images)))

  def predict_arrays(self, images: np.ndarray) -> np.ndarray:
    """Class probabilities."""
    return np.asarray(jax.nn.softmax(self._forward(jnp.asarray(images))))

  def read_image(self, path: str) -> np.ndarray:
    """One file as the model's (H, W, C) uint8 input, decoded as the training data was (`kdjax.data.images`)."""
    size, _, channels = self.spec['image_shape']
    try:
      with Image.open(path) as image:
        image.load()
        if channels == 1 and image.mode not in decoding.GRAY_MODES:
          image = image.convert('L')
        array = decoding.to_array(image, size)
    except decoding.DECODE_ERRORS as error:
      raise UserError(f'cannot read image {path} ({error}); pass image files (jpg, png, ...)') from None
    return np.repeat(array, channels, axis=-1) if array.shape[-1] != channels else array

  def predict_files(self, paths) -> list[dict]:
    probabilities = self.predict_arrays(np.stack([self.read_image(p) for p in paths]))
    names = self.spec['class_names']
    return [dict(file=path, label=names[int(p.argmax())], probability=float(p.max()),
                 probabilities={n: round(float(q), 6) for n, q in zip(names, p)})
            for path, p in zip(paths, probabilities)]


def run_spec(workdir: str) -> dict:
  """What a Predictor needs to know about a training run, from its config.json and data.json."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    with open(os.path.join(workdir, DATA_FILE)) as f:
      data = json.load(f)
  except FileNotFoundError as error:
    runs = sorted(os.path.relpath(os.path.dirname(path), workdir)
                  for path in glob.glob(os.path.join(workdir, '**', DATA_FILE), recursive=True))
    within = f'; it holds the runs {", ".join(runs[:8])}{" ..." if len(runs) > 8 else ""}: pass one' if runs else ''
    raise UserError(f'{workdir} is not a finished kdjax run or export ({error.filename} is missing){within}; '
                    'pass the --workdir of a training run') from None
  student = config['student']
  return dict(model=student['name'], model_kwargs={k: v for k, v in student.items() if k != 'name'},
              compute_dtype=config.get('compute_dtype', 'float32'), plugins=list(config.get('plugins', ())), **data)


# The input normalisation of torchvision's (and timm's ResNet/VGG) ImageNet weights, on [0, 1] pixels.
IMAGENET_NORMALIZATION = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def recorded_normalization(workdir: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) per channel that the model in `workdir` was trained with, on [0, 1] pixels: data.json of a
  training run, config.json's `normalization` of an import (ImageNet's for an import recorded before imports
  recorded it: the only statistics the importer ever assumed); None when the run records none."""
  imported = read_json(os.path.join(workdir, 'config.json'))
  record = read_json(os.path.join(workdir, DATA_FILE)) or imported.get('normalization') or (
      IMAGENET_NORMALIZATION if 'imported_from' in imported else {})
  if 'mean' not in record:
    return None
  return tuple(map(float, record['mean'])), tuple(map(float, record['std']))


def read_json(path: str) -> dict:
  """The JSON object in `path`, or {} when there is no such file."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _build(spec: dict) -> nnx.Module:
  """The run's model, computing in the run's dtype, so that eval and predict give the training run's outputs."""
  plugins.load(spec.get('plugins', ()))  # the modules that registered a user's own model
  return create_model(spec['model'], num_classes=len(spec['class_names']), image_shape=tuple(spec['image_shape']),
                      rngs=nnx.Rngs(0), dtype=jnp.dtype(spec.get('compute_dtype', 'float32')),
                      **spec['model_kwargs'])


def export_run(workdir: str, out_dir: str | None = None) -> str:
  """Write the run's best model as `out_dir` (default WORKDIR/export); returns the folder."""
  predictor = Predictor._from_run(workdir)
  out_dir = out_dir or os.path.join(workdir, 'export')
  os.makedirs(out_dir, exist_ok=True)
  pure = nnx.to_pure_dict(nnx.state(predictor.model, (nnx.Param, nnx.BatchStat)))
  with open(os.path.join(out_dir, 'params.msgpack'), 'wb') as f:
    f.write(serialization.msgpack_serialize(jax.device_get(pure)))
  with open(os.path.join(out_dir, 'model.json'), 'w') as f:
    json.dump(predictor.spec, f, indent=2)
  return out_dir


def evaluate_split(predictor: Predictor, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> dict:
  """Top-1 / top-5 accuracy of a predictor on uint8 images, ranked as training's evaluations rank them: on the
  logits (saturated float32 probabilities tie where the logits do not), ties broken as `argmax` does."""
  from kdjax.metrics import top_k_correct  # the training metric itself, so both report the same figure
  top1 = top5 = 0.0
  for start in range(0, len(labels), batch_size):
    logits = jnp.asarray(predictor.predict_logits(images[start:start + batch_size]))
    batch_labels = jnp.asarray(labels[start:start + batch_size], jnp.int32)
    top1 += float(jnp.sum(top_k_correct(logits, batch_labels, 1)))
    top5 += float(jnp.sum(top_k_correct(logits, batch_labels, 5)))
  return dict(top1=top1 / len(labels), top5=top5 / len(labels), examples=int(len(labels)))
