"""kdjax against the PyTorch peer, end to end: the same files, models, batch size, epochs and recipe, one device.

Why: the peer (`torch_kd_peer.py`: bf16 autocast, channels_last, torch.compile, data resident on the GPU) is what a
careful user would write instead of kdjax, so kdjax/peer images/s per phase, with both accuracies beside it, is the
figure that says whether kdjax is worth using. Both sides train a teacher on labels, a student on labels, and the
student with Hinton KD from that teacher; kdjax through `kdjax.train.train_and_evaluate` (configs built from
`kdjax.config.base_config()`, one sub-workdir per run), the peer in a subprocess whose JSON lines are parsed.

The peer runs first, so that JAX (which reserves most of the GPU's memory when it starts) is not yet holding the
device. It needs torch with CUDA; without them kdjax runs alone and the report says the peer was skipped.

  python -m benchmarks.side_by_side --data ../shared/data/cifar10-jpeg.tar.gz --epochs-teacher 30 \
      --epochs-student 15 --kd 0.5:4:0.02 --json side_by_side.json
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

if __package__ in (None, ''):  # run as `python benchmarks/side_by_side.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from benchmarks import common  # noqa: E402
from kdjax import config as config_lib  # noqa: E402
from kdjax import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER = os.path.join(ROOT, '..', 'shared', 'bench', 'torch_kd_peer.py')
PHASES = ('teacher', 'student_ce', 'student_kd')
# The models the peer defines (its --teacher / --student choices), under kdjax's names for the same shapes.
PEER_TEACHERS = ('resnet18_cifar', 'resnet34', 'resnet18')
PEER_STUDENTS = ('cnn2', 'resnet18')
COLUMNS = [('phase', 'phase'), ('kdjax_images_per_s', 'kdjax img/s'), ('peer_images_per_s', 'peer img/s'),
           ('images_per_s_ratio', 'img/s kdjax/peer'), ('kdjax_wall_s', 'kdjax wall s'), ('peer_wall_s', 'peer wall s'),
           ('kdjax_compile_s', 'kdjax compile s'), ('kdjax_top1', 'kdjax top-1'), ('peer_top1', 'peer top-1')]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', required=True, help='image-folder tree or .tar.gz: ROOT/{train,test|val}/<class>/*')
  parser.add_argument('--peer', default=DEFAULT_PEER, help='the PyTorch peer script')
  parser.add_argument('--teacher', default='resnet18_cifar')
  parser.add_argument('--student', default='cnn2')
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--eval-batch', type=int, default=0, help='kdjax eval batch; 0 = 2 x --batch')
  parser.add_argument('--epochs-teacher', type=float, default=15)
  parser.add_argument('--epochs-student', type=float, default=15)
  parser.add_argument('--kd', default='0.9:4:0.05', help='alpha:temperature:lr of the KD student (the peer\'s form)')
  parser.add_argument('--lr-teacher', type=float, default=0.2)
  parser.add_argument('--lr-student', type=float, default=0.05)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'), help='kdjax compute dtype')
  parser.add_argument('--eval-split', default='auto', help="kdjax's eval split; auto: test, else val (as the peer)")
  parser.add_argument('--log-every-steps', type=int, default=50, help='kdjax metric reads (host syncs)')
  parser.add_argument('--workdir', default='', help='parent of the kdjax run folders (default: a new temp folder)')
  parser.add_argument('--cache-dir', default='', help="kdjax's decode cache ('' = ~/.cache/kdjax)")
  parser.add_argument('--skip-peer', action='store_true')
  parser.add_argument('--force-peer', action='store_true',
                      help='run the peer even without torch, CUDA or its model names (e.g. a stand-in script)')
  parser.add_argument('--peer-no-compile', action='store_true', help='pass --no-compile to the peer')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# The peer.

def cuda_torch() -> bool:
  """Whether torch sees a CUDA device, asked in a child process so this one never initialises CUDA for torch."""
  probe = subprocess.run([sys.executable, '-c', 'import torch; print(torch.cuda.is_available())'],
                         capture_output=True, text=True)
  return probe.stdout.strip() == 'True'


def peer_skip_reason(args) -> str:
  """'' if the peer can run these settings, else why not (`--force-peer` overrides the checks it can)."""
  whole = all(float(e).is_integer() and e >= 2 for e in (args.epochs_teacher, args.epochs_student))
  required = [
      (args.skip_peer, '--skip-peer'),
      (not os.path.exists(args.peer), f'peer script {args.peer} not found'),
      (not whole, 'the peer takes whole epochs, at least 2 (it times every epoch after the first)'),
  ]
  expected = [
      (lambda: importlib.util.find_spec('torch') is None, 'torch is not installed'),
      (lambda: args.teacher not in PEER_TEACHERS, f'the peer has no teacher {args.teacher} '
                                                  f'({", ".join(PEER_TEACHERS)})'),
      (lambda: args.student not in PEER_STUDENTS, f'the peer has no student {args.student} '
                                                  f'({", ".join(PEER_STUDENTS)})'),
      (lambda: not cuda_torch(), 'torch has no CUDA device (the peer runs on "cuda" only)'),
  ]
  reason = next((why for failed, why in required if failed), '')
  if not reason and not args.force_peer:
    reason = next((why for failed, why in expected if failed()), '')
  return reason


def peer_command(args) -> list[str]:
  command = [sys.executable, args.peer, '--data', args.data, '--teacher', args.teacher, '--student', args.student,
             '--batch', str(args.batch), '--epochs-teacher', str(int(args.epochs_teacher)),
             '--epochs-student', str(int(args.epochs_student)), '--kd', args.kd,
             '--lr-teacher', str(args.lr_teacher), '--lr-student', str(args.lr_student)]
  return command + (['--no-compile'] if args.peer_no_compile else [])


def run_peer(command: list[str]) -> dict:
  """Run the peer, echoing its lines; its JSON lines by phase, with the exit status."""
  print('peer:', ' '.join(command), flush=True)
  t0 = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  records = {}
  for line in process.stdout:
    print('peer |', line.rstrip(), flush=True)
    if line.startswith('{'):
      record = json.loads(line)
      records[record.get('phase', '?')] = record
  returncode = process.wait()
  return dict(status='ran' if returncode == 0 else f'failed (exit {returncode})', returncode=returncode,
              command=' '.join(command), seconds=round(time.perf_counter() - t0, 1), records=records)


# ---------------------------------------------------------------------------------------------------------------
# kdjax.

def eval_split_of(path: str) -> str:
  """'test' or 'val': the split folder next to train/, found the way the peer finds it."""
  if os.path.isdir(path):
    for dirpath, dirnames, _ in os.walk(path):
      for split in ('test', 'val'):
        if 'train' in dirnames and split in dirnames:
          return split
  else:
    with tarfile.open(path) as tar:
      for member in tar:
        parts = member.name.strip('/').split('/')
        for split in ('test', 'val'):
          if split in parts[:-1] and not member.isdir():
            return split
  raise SystemExit(f'no test/ or val/ split folder in {path}')


def parse_kd(spec: str) -> tuple[float, float, float]:
  """The peer's 'alpha:temperature:lr' (one setting: the side-by-side compares one KD run)."""
  values = spec.split(':')
  if ',' in spec or len(values) != 3:
    raise SystemExit(f'--kd {spec!r}: give one alpha:temperature:lr, e.g. 0.5:4:0.02')
  alpha, temperature, learning_rate = (float(v) for v in values)
  return alpha, temperature, learning_rate


def kdjax_config(args, *, model: str, epochs: float, learning_rate: float, losses: dict, eval_split: str,
                 teacher_workdir: str = '') -> ml_collections.ConfigDict:
  """One run in the peer's recipe: crop+flip, SGD Nesterov one-cycle, evaluation once at the end."""
  cfg = config_lib.base_config()
  cfg.data.dataset = os.path.abspath(os.path.expanduser(args.data))
  cfg.data.train_split, cfg.data.eval_split = 'train', eval_split
  cfg.data.augment = 'crop_flip'
  cfg.data.cache_dir = args.cache_dir
  cfg.student = ml_collections.ConfigDict(dict(name=model, **common.ARCH_KWARGS.get(model, {})))
  cfg.teacher.name, cfg.teacher.workdir = args.teacher, teacher_workdir
  cfg.compute_dtype = args.dtype
  cfg.batch_size, cfg.eval_batch_size = args.batch, args.eval_batch
  cfg.phases.train = config_lib.phase(epochs, losses, common.peer_recipe(learning_rate))
  cfg.eval_every_epochs = float(epochs)  # the peer evaluates once, after training
  cfg.log_every_steps = args.log_every_steps
  return cfg


def run_kdjax(args, root: str, on_run=lambda summaries: None) -> dict:
  """The three runs in sub-workdirs of `root`; their summaries by phase (`on_run(summaries so far)` after each)."""
  alpha, temperature, kd_lr = parse_kd(args.kd)
  eval_split = eval_split_of(args.data) if args.eval_split == 'auto' else args.eval_split
  ce = {'ce': config_lib.loss_term('ce')}
  hinton = {'kd': config_lib.loss_term('hinton_kd', alpha=alpha, temperature=temperature)}
  teacher_dir = os.path.join(root, 'teacher')
  runs = {
      'teacher': kdjax_config(args, model=args.teacher, epochs=args.epochs_teacher, learning_rate=args.lr_teacher,
                              losses=ce, eval_split=eval_split),
      'student_ce': kdjax_config(args, model=args.student, epochs=args.epochs_student,
                                 learning_rate=args.lr_student, losses=ce, eval_split=eval_split),
      'student_kd': kdjax_config(args, model=args.student, epochs=args.epochs_student, learning_rate=kd_lr,
                                 losses=hinton, eval_split=eval_split, teacher_workdir=teacher_dir),
  }
  summaries = {}
  for name, cfg in runs.items():
    print(f'kdjax: {name}', flush=True)
    summaries[name] = train.train_and_evaluate(cfg, os.path.join(root, name))
    on_run(summaries)
  return summaries


# ---------------------------------------------------------------------------------------------------------------
# The comparison.

def ratio(numerator, denominator):
  return numerator / denominator if numerator and denominator else None


def compare(kdjax: dict, peer_records: dict) -> list[dict]:
  """One row per phase: both sides' images/s, wall time and accuracy, and kdjax/peer images/s."""
  rows = []
  for name in PHASES:
    ours, theirs = kdjax.get(name, {}), peer_records.get(name, {})
    rows.append(dict(phase=name, kdjax_images_per_s=ours.get('train_images_per_s'),
                     peer_images_per_s=theirs.get('train_img_per_s'),
                     images_per_s_ratio=ratio(ours.get('train_images_per_s'), theirs.get('train_img_per_s')),
                     kdjax_wall_s=ours.get('wall_s'), peer_wall_s=theirs.get('wall_s'),
                     wall_s_ratio=ratio(ours.get('wall_s'), theirs.get('wall_s')),
                     kdjax_compile_s=ours.get('compile_s'), kdjax_top1=ours.get('eval_top1'),
                     peer_top1=theirs.get('test_acc')))
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  args.eval_batch = args.eval_batch or 2 * args.batch
  parse_kd(args.kd)
  skip = peer_skip_reason(args)
  peer = dict(status='skipped', reason=skip, records={}) if skip else run_peer(peer_command(args))
  if skip:
    print(f'peer skipped: {skip}', flush=True)
  root = args.workdir or tempfile.mkdtemp(prefix='kdjax_side_by_side_')
  root = os.path.join(root, time.strftime('%Y%m%d-%H%M%S'))
  # A call cut short (the device's time limit) still leaves what finished: the JSON is rewritten after each part.
  partial = lambda kdjax: common.write_json(args.json, dict(partial=True, workdir=root, peer=peer, kdjax=kdjax))
  partial({})
  kdjax = run_kdjax(args, root, partial)  # JAX starts only now, after the peer has given the GPU back
  rows = compare(kdjax, peer['records'])
  title = (f"{args.data}, batch {args.batch}, epochs {args.epochs_teacher:g}/{args.epochs_student:g}, kd {args.kd}; "
           f"peer: {peer['status']}{' (' + skip + ')' if skip else ''}")
  return common.publish('side_by_side', argv, args, title, rows, COLUMNS, workdir=root, peer=peer, kdjax=kdjax,
                        phases={row['phase']: row for row in rows})


if __name__ == '__main__':
  main()
