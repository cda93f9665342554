"""Writes a compact, downscaled JPEG copy of an image-folder tree: `python -m kdjax.data.compact SRC OUT.tar.gz`.

Used to carry a dataset to a machine with a small transfer limit: Imagenette (13,394 images) at 128 px and the
default quality 85 is about 58 MiB.
SRC is a folder or a `.tar.gz` holding `<split>/<class>/<images>` (under at most some shared top folders, which are
dropped); OUT holds the same layout under one top folder named after OUT, so `load_split(OUT, ...)` reads it.
Each image's short side is scaled down to `--size` with Pillow BICUBIC, keeping the aspect ratio (square sources
come out size x size; smaller images are not enlarged), and re-encoded as JPEG; grayscale stays grayscale.
An archive is read as a stream, without extracting it.
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
from kdjax.errors import UserError

_BATCH = 512  # Images held in memory at once between reading and writing.


def _folder_members(root: str):
  """Yields (relative path, bytes) for every image file under `root`, in sorted order."""
  for parent, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(files):
      if images.is_image_file(name) and not name.startswith('.'):
        path = os.path.join(parent, name)
        with open(path, 'rb') as f:
          yield os.path.relpath(path, root).replace(os.sep, '/'), f.read()


def _archive_members(path: str):
  """Yields (member name, bytes) for every image file of a `.tar.gz`, reading it once as a stream."""
  with tarfile.open(path, 'r|gz') as tar:
    for member in tar:
      name = posixpath.normpath(member.name).lstrip('/')
      hidden = any(part.startswith('.') for part in name.split('/'))
      if member.isfile() and images.is_image_file(name) and not hidden:
        yield name, tar.extractfile(member).read()


def _drop_shared_top(names: list[str]) -> list[str]:
  """Drops leading folders shared by all names while more than <split>/<class>/<file> remains."""
  parts = [name.split('/') for name in names]
  while parts and all(len(p) > 3 for p in parts) and len({p[0] for p in parts}) == 1:
    parts = [p[1:] for p in parts]
  return ['/'.join(p) for p in parts]


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
    try:
      return name, shrink(data, size, quality)
    except images.DECODE_ERRORS as error:
      print(f'skipping unreadable {name}: {error}', file=sys.stderr)
      return name, None

  # Shared top folders are known only once every name is seen, so the (small, re-encoded) images are kept in memory
  # until then; the larger source bytes are read one batch at a time.
  with concurrent.futures.ThreadPoolExecutor() as pool, tarfile.open(partial, 'w:gz', compresslevel=6) as tar:
    converted = []
    for batch in _batches(members):
      converted += [(name, data) for name, data in pool.map(convert, batch)]
    names = _drop_shared_top([name for name, _ in converted])
    for name, (_, data) in zip(names, converted):
      if data is None:
        skipped += 1
        continue
      info = tarfile.TarInfo(f'{top}/{_jpeg_name(name)}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
      written += 1
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
