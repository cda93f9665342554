"""Name -> constructor registry for the image classifiers.

Configs name a model by string (`model: resnet34`), so the trainer needs one place that turns that string into a
module. Each architecture file registers its variants at import time with `register_model`; `kdjax.models` imports
all of them, so `MODELS` is complete as soon as the package is imported.
"""

import functools
import inspect
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from kdjax import registries
from kdjax.errors import UserError

# Every constructor takes `num_classes=`, `image_shape=`, `rngs=`, `dtype=` and optional architecture keywords, and
# returns an `nnx.Module` whose `__call__(x, *, train)` gives `(logits, features)` (see `kdjax.models`).
ModelConstructor = Callable[..., nnx.Module]

MODELS: dict[str, ModelConstructor] = {}
_ORIGINS: dict[str, str] = {}  # name -> the file that registered it


def register_model(name: str, constructor: ModelConstructor | None = None):
  """Adds `constructor` to `MODELS` under `name`.

  Works as a decorator (`@register_model('cnn2')`) or, for variants that only fix keyword arguments, as a call
  (`register_model('resnet18', functools.partial(ResNet, ...))`) so that each variant stays one line. A name another
  file registered is a programming error, so it raises `ValueError`, not `UserError` (see `kdjax.registries`).
  """
  origin = registries.caller_file()

  def add(fn: ModelConstructor) -> ModelConstructor:
    registries.add(MODELS, _ORIGINS, name, fn, what='model', origin=origin)
    return fn

  return add if constructor is None else add(constructor)


def create_model(
  name: str,
  *,
  num_classes: int,
  image_shape: tuple[int, int, int],
  rngs: nnx.Rngs,
  dtype: Any = jnp.float32,
  **kwargs,
) -> nnx.Module:
  """Builds the registered model `name`.

  `image_shape` is (H, W, C). `dtype` is the compute dtype (parameters are always float32). Extra `kwargs` go to the
  architecture (e.g. `dropout=0.3`); names it does not accept raise `UserError` listing the ones it does, because
  they come from a user's config and a bare `TypeError` deep in a constructor would not say which key was wrong.
  """
  check_model(name, kwargs)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise UserError(f'num_classes must be a positive integer, got {num_classes!r}')
  image_shape = tuple(image_shape)
  if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
    raise UserError(f'image_shape must be (height, width, channels) of positive integers, got {image_shape!r}')
  try:
    return MODELS[name](num_classes=num_classes, image_shape=image_shape, rngs=rngs, dtype=dtype, **kwargs)
  except (ValueError, TypeError, ZeroDivisionError) as error:  # an argument value the architecture cannot build
    if not kwargs:
      raise
    settings = ', '.join(f'{key}={value!r}' for key, value in kwargs.items())
    raise UserError(f'model {name} cannot be built with {settings} ({type(error).__name__}: {error}); fix those '
                    'values (the config\'s `student.*` or `teacher.*` keys)') from None


def check_model(name: str, kwargs: dict[str, Any]) -> None:
  """Raises `UserError` for an unregistered `name` or architecture arguments it does not take (what `validate`
  checks before any data is read, and `create_model` again)."""
  if name not in MODELS:
    raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
  _check_arch_kwargs(name, MODELS[name], kwargs)


_CONTRACT_ARGS = frozenset({'num_classes', 'image_shape', 'rngs', 'dtype'})


def _check_arch_kwargs(name: str, constructor: ModelConstructor, kwargs: dict[str, Any]) -> None:
  """Raises `UserError` if `constructor` does not accept the keyword arguments `kwargs`.

  The signature is read from the underlying `__init__`: NNX module classes report `(*args, **kwargs)` through their
  metaclass, and `functools.partial` keywords only change defaults, not which names are accepted.
  """
  target = constructor
  while isinstance(target, functools.partial):
    target = target.func
  if isinstance(target, type):
    target = target.__init__
  params = inspect.signature(target).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  accepted = sorted(
    n for n, p in params.items()
    if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    and n not in _CONTRACT_ARGS and n != 'self'
  )
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise UserError(
      f"model {name!r} does not take argument(s) {', '.join(unknown)}; "
      f"it accepts: {', '.join(accepted) if accepted else '(none)'}"
    )
