"""The on-disk cache: extracted archives and decoded arrays, each published by an atomic rename.

Work is written into a temporary sibling folder and renamed into place only when complete, so a run killed midway
leaves a stray temporary folder, never a half-filled entry that a later run would trust. Entries are keyed by a hash
of what they were made from; a changed input gets a new key rather than invalidating an old one.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from kdjax.data import images
from kdjax.data.splits import ArraySplit

DEFAULT_CACHE_DIR = '~/.cache/kdjax'
# Bumped whenever the decoded format or the decoding itself changes, so old entries are not reused.
_DECODED_VERSION = 3  # 2: 16-bit images scaled to 8 bits, float images refused; 3: __MACOSX is no class


def cache_root(cache_dir: str | None) -> str:
  return os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))


def digest(*parts: object) -> str:
  return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]


@contextlib.contextmanager
def publish(final: str):
  """Yields a temporary folder next to `final` and renames it to `final` if the block succeeds.

  If another process published `final` first, its entry is kept and ours is dropped (both are equivalent).
  """
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  temp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(final)}-', dir=parent)
  try:
    yield temp
    try:
      os.rename(temp, final)
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    shutil.rmtree(temp, ignore_errors=True)


def decoded_dir(cache_dir: str | None, *key: object) -> str:
  return os.path.join(cache_root(cache_dir), 'decoded', digest(_DECODED_VERSION, *key))


def save_decoded(folder: str, split: ArraySplit, skipped_names: list[str], description: str) -> None:
  with publish(folder) as temp:
    np.save(os.path.join(temp, 'images.npy'), split.images)
    np.save(os.path.join(temp, 'labels.npy'), split.labels)
    meta = {'class_names': list(split.class_names), 'skipped': skipped_names, 'source': description}
    with open(os.path.join(temp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)


def load_decoded(folder: str) -> tuple[ArraySplit, list[str]] | None:
  """Returns (split, skipped file names) from a decoded entry, or None when there is none."""
  if not os.path.isdir(folder):
    return None
  with open(os.path.join(folder, 'meta.json')) as f:
    meta = json.load(f)
  split = ArraySplit(
      images=np.load(os.path.join(folder, 'images.npy')),
      labels=np.load(os.path.join(folder, 'labels.npy')),
      class_names=tuple(meta['class_names']),
      skipped=len(meta['skipped']))
  return split, meta['skipped']


def load_or_decode(folder: str, decode, *, on_corrupt: str, description: str) -> ArraySplit:
  """Loads the decoded entry at `folder`, or runs `decode() -> (split, skipped names)` and saves it there.

  An entry decoded with `on_corrupt='skip'` remembers what it skipped, so reading it back with `'error'` still
  reports the unreadable file instead of silently returning fewer images.
  """
  found = load_decoded(folder)
  if found is None:
    found = decode()
    save_decoded(folder, *found, description)
  split, skipped_names = found
  if skipped_names and on_corrupt == 'error':
    raise images.corrupt_error(skipped_names[0], 'skipped when this split was first decoded')
  return split
