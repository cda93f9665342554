"""Extracting a `.tar.gz` image tree once into the cache and reusing it.

The extraction folder is keyed by the archive's absolute path, size, modification and change times (`archive_key`),
so replacing the archive
gives a fresh extraction while an unchanged one is never unpacked twice. Extraction goes through
`cache.publish` (temporary folder + atomic rename), so an interrupted extraction is never mistaken for a complete one.
"""

import os
import tarfile
import zlib

from kdjax.data import cache
from kdjax.errors import UserError

ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz')


def is_archive(path: str) -> bool:
  return path.lower().endswith(ARCHIVE_SUFFIXES)


def archive_key(path: str) -> tuple:
  """What identifies an archive's content cheaply: its absolute path, size, modification time and change time.
  The change time is set by the file system on every write and cannot be set back (`cp -p` and `rsync -a` restore
  the modification time of a rebuilt archive, not this), so new content of the same size is a new key. The price:
  a metadata change (chmod, a new hard link) also gives a new key, so one more extraction and decode."""
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _stem(path: str) -> str:
  name = os.path.basename(path)
  return name[:-len(next(s for s in ARCHIVE_SUFFIXES if name.lower().endswith(s)))]


def _extract(path: str, dest: str) -> None:
  # The 'data' filter refuses absolute paths, links out of `dest` and device files.
  with tarfile.open(path, 'r:gz') as tar:
    tar.extractall(dest, filter='data')


def extract_once(path: str, cache_dir: str | None) -> str:
  """Returns the folder holding the (existing) archive's content, extracting it unless complete already."""
  folder = os.path.join(cache.cache_root(cache_dir), 'extracted', f'{_stem(path)}-{cache.digest(*archive_key(path))}')
  if not os.path.isdir(folder):
    with cache.publish(folder) as temp:
      try:
        _extract(path, temp)
      except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise UserError(
            f'cannot extract dataset archive {path} ({error}); re-create or re-download it, or point data.dataset at'
            ' the unpacked folder') from error
  return folder
