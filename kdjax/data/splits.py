"""In-memory splits and tfds-style split slicing (`train[:25%]`, `test[-100:]`).

Every source returns a whole split as an `ArraySplit` in a fixed order; slicing happens afterwards here, so one
decoded cache serves every slice of a split. The slice syntax and percent rounding follow tfds
(`ReadInstruction(..., rounding='closest')`, i.e. `round(pct * n / 100)`), so a config written for a tfds dataset
means the same thing for an image folder. We parse it ourselves rather than through tfds' `ReadInstruction`, whose
`to_absolute` expects tfds' own `SplitInfo` objects.
"""

import dataclasses
import re

import numpy as np

from kdjax.errors import UserError

# The seed of the one shuffle applied to folder-style sources before slicing. Changing it changes what
# `train[:10%]` means for every saved experiment, so it is a constant, not a setting.
ORDER_SEED = 0

_SPEC_RE = re.compile(r'^(?P<name>[\w-]+)(?:\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\])?$')
_BOUND_RE = re.compile(r'^(?P<value>-?\d+(?:\.\d+)?)(?P<pct>%?)$')


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """A decoded split held in memory.

  Attributes:
    images: uint8 array (N, H, W, C); C is 1 for grayscale data and 3 for RGB.
    labels: int32 array (N,), indices into `class_names`.
    class_names: the class names; a label is a position in this tuple.
    skipped: how many unreadable files were skipped (only with `on_corrupt='skip'`).
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  skipped: int = 0

  def __len__(self) -> int:
    return len(self.labels)

  def select(self, index: slice) -> 'ArraySplit':
    """Returns the examples at `index`, keeping the class list (a slice may miss some classes)."""
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A parsed split spec: a split name plus an optional `[start:stop]` slice.

  `unit` is 'abs' (example counts) or '%' (percent of the split size); `None` bounds are open.
  """

  name: str
  start: float | None = None
  stop: float | None = None
  unit: str = 'abs'

  @property
  def is_whole(self) -> bool:
    return self.start is None and self.stop is None

  def to_slice(self, num_examples: int, spec: str = '') -> slice:
    """Resolves the bounds against a split of `num_examples`, rounding percents like tfds."""
    bounds = [_absolute(b, self.unit, num_examples, spec or self.name) for b in (self.start, self.stop)]
    start, stop, _ = slice(*bounds).indices(num_examples)
    if stop <= start:
      raise UserError(
          f'split {spec or self.name!r} selects no examples out of {num_examples}; widen the slice')
    return slice(start, stop)


def _absolute(bound: float | None, unit: str, num_examples: int, spec: str) -> int | None:
  if bound is None:
    return None
  if unit == '%':
    bound = int(round(bound * num_examples / 100.0))  # tfds' 'closest' rounding (round half to even).
  if abs(bound) > num_examples:
    raise UserError(f'split {spec!r} reaches past the {num_examples} examples of the split; use a smaller bound')
  return int(bound)


def parse_split(spec: str) -> SplitSpec:
  """Parses `name`, `name[a:b]`, `name[a%:b%]` (open or negative bounds allowed, like tfds)."""
  how = 'write it like train, train[:25%], train[25%:], train[10:200] or test[-100:]'
  match = _SPEC_RE.match(str(spec).replace(' ', ''))
  if not match:
    raise UserError(f'malformed split {spec!r}; {how}')
  bounds, units = [], set()
  for text in (match['start'], match['stop']):
    if not text:
      bounds.append(None)
      continue
    bound = _BOUND_RE.match(text)
    if not bound or (not bound['pct'] and '.' in bound['value']):
      raise UserError(f'malformed split {spec!r}: bad slice bound {text!r}; {how}')
    units.add('%' if bound['pct'] else 'abs')
    bounds.append(float(bound['value']) if bound['pct'] else int(bound['value']))
  if len(units) > 1:
    raise UserError(f'malformed split {spec!r}: both bounds must be percents or both counts; {how}')
  if match['start'] is not None and bounds == [None, None]:
    raise UserError(f'malformed split {spec!r}: empty slice; {how}')
  unit = units.pop() if units else 'abs'
  if unit == '%' and any(b is not None and abs(b) > 100 for b in bounds):
    raise UserError(f'malformed split {spec!r}: percents must lie in [-100%, 100%]; {how}')
  return SplitSpec(match['name'], bounds[0], bounds[1], unit)


def fixed_order(num_examples: int) -> np.ndarray:
  """The one permutation applied to a folder-style split before slicing.

  Files are first sorted by (class, filename), then shuffled with `ORDER_SEED`, so `train[:25%]` is a
  random-looking, roughly class-balanced subset rather than the first classes, and it is the same subset on every
  machine and run.
  """
  return np.random.default_rng(ORDER_SEED).permutation(num_examples)
