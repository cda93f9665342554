"""Writes a compact, downscaled JPEG copy of an image-folder tree: `python -m kdjax.data.compact SRC OUT.tar.gz`.

Used to carry a dataset to a machine with a small transfer limit: Imagenette (13,394 images) at 128 px and the
default quality 85 is about 58 MiB.
SRC is a folder or a `.tar.gz` holding `<split>/<class>/<images>` (under at most some shared top folders, which are
dropped); OUT holds the same layout under one top folder named after OUT, so `load_split(OUT, ...)` reads it.
Each image's short side is scaled down to `--size` with Pillow BICUBIC, keeping the aspect ratio (square sources
come out size x size; smaller images are not enlarged), and re-encoded as JPEG; grayscale stays grayscale.
An archive is read as a stream, without extracting it. Every class folder is kept, also one whose images are all
unreadable (or none), so the copy's class list and label indices are the source's; files the loader ignores
(hidden, `__MACOSX`) are left out; a dataset labelled by files (Tiny-ImageNet's layout) is refused.
"""

import argparse
import concurrent.futures
import io
import os
import posixpath
import sys
import tarfile

from PIL import Image

from kdjax.data import archive
from kdjax.data import images
from kdjax.data import tiny_imagenet
from kdjax.errors import UserError

_BATCH = 512  # Images held in memory at once between reading and writing.
_LABEL_FILES = (tiny_imagenet.WNIDS, os.path.basename(tiny_imagenet.ANNOTATIONS))  # labels outside the tree


def _hidden(name: str) -> bool:
  """Whether the loader ignores a path (`images.is_ignored` of any of its parts)."""
  return any(images.is_ignored(part) for part in name.split('/'))


def _refuse_label_files(name: str) -> None:
  if posixpath.basename(name) in _LABEL_FILES:
    raise UserError(f'{name}: this dataset is labelled by files ({", ".join(_LABEL_FILES)}: Tiny-ImageNet\'s'
                    ' layout), which a compact copy of <split>/<class>/<images> would lose; read it directly'
                    ' (data.dataset=<its folder or .tar.gz>), it is 64 px already')


def _folder_members(root: str):
  """Yields (relative path, bytes) for every image file under `root`, in sorted order, and (folder + '/', None)
  for every folder, so a class folder without readable images keeps its place in the class list."""
  for parent, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not _hidden(d))
    relative = os.path.relpath(parent, root).replace(os.sep, '/')
    if relative != '.':
      yield relative + '/', None
    for name in sorted(files):
      _refuse_label_files(name)
      if images.is_image_file(name) and not images.is_ignored(name):
        path = os.path.join(parent, name)
        with open(path, 'rb') as f:
          yield os.path.relpath(path, root).replace(os.sep, '/'), f.read()


def _archive_members(path: str):
  """Like `_folder_members`, for a `.tar.gz` read once as a stream."""
  with tarfile.open(path, 'r|gz') as tar:
    for member in tar:
      name = posixpath.normpath(member.name).lstrip('/')
      if _hidden(name):
        continue
      if member.isdir():
        yield name + '/', None
      elif member.isfile():
        _refuse_label_files(name)
        if images.is_image_file(name):
          yield name, tar.extractfile(member).read()


# Folder names that are splits, never top folders to drop: a tree of one split whose images sit in sub-folders of
# their class folders (`train/cat/images/x.png`) looks like a top folder `train` above `cat/images/x.png` otherwise.
_SPLIT_NAMES = ('train', 'test', 'val', 'valid', 'validation')


def _shared_top_depth(names: list[str]) -> int:
  """How many leading folders all names share while more than <split>/<class>/<file> remains (a split's name is
  never one of them)."""
  parts, depth = [name.split('/') for name in names], 0
  while (parts and all(len(p) > depth + 3 for p in parts) and len({p[depth] for p in parts}) == 1
         and parts[0][depth].lower() not in _SPLIT_NAMES):
    depth += 1
  return depth


def _class_folders(names: list[str], depth: int) -> list[str]:
  """Every `<split>/<class>` below the shared top folders, from the folders and the image paths alike."""
  found = set()
  for name in names:
    parts = name.rstrip('/').split('/')[depth:]
    if len(parts) >= 2 and (len(parts) > 2 or name.endswith('/')):
      found.add('/'.join(parts[:2]))
  return sorted(found)


def shrink(data: bytes, size: int, quality: int) -> bytes:
  """Decodes an image, scales its short side down to `size` and re-encodes it as JPEG."""
  with Image.open(io.BytesIO(data)) as image:
    image.load()
    array = images.to_array(image, None)
  image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  factor = size / min(image.size)
  if factor < 1:
    image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC)
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=quality, optimize=True)  # optimize: smaller Huffman tables, same pixels.
  return out.getvalue()


def _jpeg_name(name: str) -> str:
  """`a.png` -> `a.png.jpg`: keeping the old extension keeps `a.png` and `a.jpg` of one folder apart."""
  return name if os.path.splitext(name)[1].lower() in ('.jpg', '.jpeg') else name + '.jpg'


def _batches(members):
  batch = []
  for member in members:
    batch.append(member)
    if len(batch) == _BATCH:
      yield batch
      batch = []
  if batch:
    yield batch


def compact(source: str, out: str, *, size: int, quality: int = 85) -> tuple[int, int]:
  """Writes the compact copy of `source` to `out`; returns (images written, unreadable images skipped)."""
  if not out.lower().endswith(archive.ARCHIVE_SUFFIXES):
    raise UserError(f'output {out} must end in .tar.gz or .tgz; name it e.g. imagenette-128.tar.gz')
  if size < 1 or not 1 <= quality <= 100:
    raise UserError(f'--size {size} --quality {quality} is out of range; use a positive size and a quality in 1..95')
  if archive.is_archive(source) and os.path.isfile(source):
    members = _archive_members(source)
  elif os.path.isdir(source):
    members = _folder_members(source)
  else:
    raise UserError(f'source {source} is neither a folder nor a .tar.gz file; check the path')
  top = os.path.basename(out)[:-len(next(s for s in archive.ARCHIVE_SUFFIXES if out.lower().endswith(s)))]
  written = skipped = 0
  partial = out + '.partial'

  def convert(member):
    name, data = member
    if data is None:  # a folder
      return name, None
    try:
      return name, shrink(data, size, quality)
    except images.DECODE_ERRORS as error:
      print(f'skipping unreadable {name}: {error}', file=sys.stderr)
      return name, None

  # Shared top folders are known only once every name is seen, so the (small, re-encoded) images are kept in memory
  # until then; the larger source bytes are read one batch at a time.
  try:
    with concurrent.futures.ThreadPoolExecutor() as pool, tarfile.open(partial, 'w:gz', compresslevel=6) as tar:
      converted = []
      for batch in _batches(members):
        converted += [(name, data) for name, data in pool.map(convert, batch)]
      files = [(name, data) for name, data in converted if not name.endswith('/')]
      depth = _shared_top_depth([name for name, _ in files])
      for name in _class_folders([name for name, _ in converted], depth):
        info = tarfile.TarInfo(f'{top}/{name}')
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
      for name, data in files:
        if data is None:
          skipped += 1
          continue
        info = tarfile.TarInfo(f'{top}/{_jpeg_name("/".join(name.split("/")[depth:]))}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        written += 1
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise
  if not written:
    os.remove(partial)
    raise UserError(f'no readable image files in {source}; check that it holds <split>/<class>/<images>')
  os.replace(partial, out)
  return written, skipped


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m kdjax.data.compact', description=__doc__.split('\n')[0])
  parser.add_argument('source', help='image-folder tree or .tar.gz of one')
  parser.add_argument('out', help='output .tar.gz')
  parser.add_argument('--size', type=int, required=True, help='short side in pixels after downscaling')
  parser.add_argument('--quality', type=int, default=85, help='JPEG quality (1-95; 85 keeps Imagenette-128 < 64 MiB)')
  args = parser.parse_args(argv)
  try:
    written, skipped = compact(args.source, args.out, size=args.size, quality=args.quality)
  except UserError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  megabytes = os.path.getsize(args.out) / 2**20
  print(f'wrote {written} images ({skipped} unreadable skipped) to {args.out}: {megabytes:.1f} MiB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
