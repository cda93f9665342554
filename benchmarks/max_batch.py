"""The largest KD training batch that fits on one device: kdjax's train program against the PyTorch peer's step.

Why: at 224 px memory, not speed, caps a distillation run (the teacher's activations are transient, the student's
are kept for the backward pass, and the resident training set sits beside them). Issue 5 asks for the largest batch
of ResNet-34 teacher -> medium student that fits, kdjax's against the peer's.

kdjax: XLA plans the whole step's buffers at compile time, and the plan is affine in the batch, so two compiles at
small batches (`--line-batches`) predict where it crosses the device's memory limit. The search then starts there:
each probe compiles the fused KD train program (`kdjax.steps.train_program`: gather, augmentation, teacher forward,
student step, metrics) at that batch and runs two steps; an allocation failure (RESOURCE_EXHAUSTED) means "does not
fit". JAX takes 75% of a GPU's memory unless told otherwise: run it with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to give
it what the peer's allocator can take (the report records the setting). Where the backend reports no memory limit
(CPU) or `--memory-limit-mib` is given, a probe instead compares XLA's plan with that limit (`--probe plan`): host
memory is not device memory, and the tests can use a small limit.

The peer (a subprocess, run first so that JAX does not yet hold the GPU): the peer script's own `kd_loss` and
`augment`, bf16 autocast, channels_last, `torch.compile`, SGD with Nesterov momentum, the training set resident on
the GPU in float32 as the peer keeps it, and the models as PyTorch twins of kdjax's (`benchmarks/torch_twins.py`,
equal parameter counts). A probe runs two steps; `torch.OutOfMemoryError` means "does not fit". Without torch+CUDA
the peer is skipped and the report says why.

Both sides search with `largest_fitting`: grow from a first guess (doubling the step) until a batch fails, then
bisect until the gap is within `--tolerance`; batches are multiples of `--multiple` (times the device count).

  python -m benchmarks.max_batch --teacher resnet34 --student resnet34_medium --image-size 224 --json max_batch.json
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ''):  # run as `python benchmarks/max_batch.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER = os.path.join(ROOT, '..', 'shared', 'bench', 'torch_kd_peer.py')
IMAGENETTE_TRAIN = 9469   # resident examples by default: the size of the Imagenette training split
COLUMNS = [('side', 'side'), ('teacher', 'teacher'), ('student', 'student'), ('image_size', 'px'),
           ('batch', 'largest batch'), ('first_failing', 'first failing'), ('probes', 'probes'),
           ('predicted', 'predicted (XLA plan)'), ('limit_mib', 'limit MiB'), ('seconds', 'search s'),
           ('status', 'status')]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', default='resnet34')
  parser.add_argument('--student', default='resnet34_medium')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--num-examples', type=int, default=IMAGENETTE_TRAIN,
                      help='resident training examples (random pixels): they occupy device memory as in a run')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--kd', default='0.5:4', help='alpha:temperature')
  parser.add_argument('--multiple', type=int, default=8, help='batches are multiples of this times the device count')
  parser.add_argument('--tolerance', type=float, default=0.05, help='stop when (first failing - largest) / largest '
                      'is at most this')
  parser.add_argument('--line-batches', default='16,32', help='the two batches whose XLA plans predict the limit')
  parser.add_argument('--probe', default='auto', choices=('auto', 'run', 'plan'),
                      help='run: compile and run two steps; plan: XLA plan <= limit; auto: run where the device '
                      'reports a memory limit, else plan')
  parser.add_argument('--memory-limit-mib', type=float, default=0, help='0 = the device\'s bytes_limit')
  parser.add_argument('--sides', default='peer,kdjax', help='comma-separated: peer, kdjax')
  parser.add_argument('--peer', default=DEFAULT_PEER, help='the PyTorch peer script (its kd_loss and augment)')
  parser.add_argument('--peer-start', type=int, default=64, help="the peer's first probe")
  parser.add_argument('--peer-no-compile', action='store_true')
  parser.add_argument('--peer-device', default='cuda', help='torch device of the peer (cpu only to test the script)')
  parser.add_argument('--force-peer', action='store_true', help='run the peer without a CUDA device (with '
                      '--peer-device cpu nothing runs out of memory: the search ends at --max-batch)')
  parser.add_argument('--max-batch', type=int, default=0, help='largest batch tried; 0 = --num-examples')
  parser.add_argument('--json', default='')
  parser.add_argument('--peer-child', action='store_true', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# The search, shared by both sides.

def largest_fitting(fits, guess: int, multiple: int, ceiling: int, tolerance: float) -> dict:
  """The largest multiple of `multiple` not above `ceiling` for which `fits(batch)` holds, assuming fitting is
  monotone in the batch. Grows (or shrinks) from `guess` with a doubling step until the answer is bracketed, then
  bisects until first_failing - batch <= max(multiple, tolerance * batch). Returns {batch, first_failing, probes}
  with every (batch, fits) probe in order; batch is 0 if even `multiple` does not fit, first_failing None if
  `ceiling` fits."""
  ceiling -= ceiling % multiple
  probes = []

  def probe(batch):
    ok = bool(fits(batch))
    probes.append((batch, ok))
    print(f'batch {batch}: {"fits" if ok else "does not fit"}', flush=True)  # a run cut short still shows the bracket
    return ok

  def snap(value):
    return max(multiple, min(ceiling, int(value) - int(value) % multiple))

  def done(lo, hi):
    return hi is None or hi - lo <= max(multiple, tolerance * lo)

  lo, hi, step = 0, None, max(multiple, snap(guess * tolerance))
  batch = snap(guess)
  if probe(batch):
    lo = batch
    while hi is None and lo < ceiling:
      batch = snap(lo + step)
      if probe(batch):
        lo, step = batch, 2 * step
      else:
        hi = batch
  else:
    hi = batch
    while lo == 0 and hi > multiple:
      batch = snap(hi - step) if hi - step >= multiple else multiple
      if probe(batch):
        lo = batch
      else:
        hi, step = batch, 2 * step
  while lo and not done(lo, hi):
    batch = snap((lo + hi) // 2)
    if batch in (lo, hi):
      break
    if probe(batch):
      lo = batch
    else:
      hi = batch
  return dict(batch=lo, first_failing=hi, probes=probes)


def ceiling(args) -> int:
  """The largest batch either side tries: --max-batch, at most the resident examples (one rule for both sides, so
  that "fits up to the ceiling" means the same on each)."""
  return min(args.max_batch or args.num_examples, args.num_examples)


def parse_kd(spec: str) -> tuple[float, float]:
  alpha, temperature = (float(v) for v in spec.split(':'))
  return alpha, temperature


# ---------------------------------------------------------------------------------------------------------------
# kdjax.

def _is_out_of_memory(error: Exception) -> bool:
  """XLA's RESOURCE_EXHAUSTED, or an allocation failure as CUDA, cuDNN or cuBLAS word it."""
  text = str(error)
  return any(sign in text for sign in ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory', 'ALLOC_FAILED',
                                        'Failed to allocate', 'failed to allocate'))


def kdjax_side(args) -> dict:
  """Search the largest global batch of the KD train program; {batch, first_failing, probes, predicted, ...}."""
  import jax
  from benchmarks import common
  from kdjax import mesh as mesh_lib
  from kdjax import metrics as metrics_lib

  devices = jax.device_count()
  images, labels, num_classes = common.synthetic_images(args.num_examples, args.image_size)
  labels = labels % args.num_classes
  mesh = mesh_lib.make_data_mesh()
  dtype = common.dtype_of(args.dtype)
  preprocess = common.make_preprocess(images, dtype, 'crop_flip')
  dataset = common.resident(images, labels, mesh)
  del images
  teacher = common.frozen_teacher(args.teacher, num_classes=args.num_classes,
                                  image_shape=(args.image_size, args.image_size, 3), dtype=dtype, mesh=mesh)
  alpha, temperature = parse_kd(args.kd)
  losses = common.phase_losses((alpha, temperature))['student_kd'][1]
  replicated = mesh_lib.replicated(mesh)
  split = (dataset.images, dataset.labels)

  def compiled_at(batch):
    phase = common.build_phase('student_kd', args.student, losses, teacher=teacher, num_classes=args.num_classes,
                               image_shape=(args.image_size, args.image_size, 3), preprocess=preprocess,
                               opt_cfg=common.peer_recipe(0.05), total_steps=10, dataset=dataset, batch_size=batch,
                               mesh=mesh)
    acc = metrics_lib.empty_like(phase.metrics_template, replicated)
    order = dataset.epoch_order(0, 0)
    compiled = phase.steps_fn.lower(phase.state, phase.teacher_vars, split, order, acc).compile()
    return phase, acc, order, compiled

  def release():
    # Dropping the references frees the probe's buffers; jax.clear_caches() would also throw away the small
    # compiled init kernels that every probe reuses (about 50 recompiles a probe, measured on CPU).
    gc.collect()

  def plan_at(batch):
    _, _, _, compiled = compiled_at(batch)
    value = common.compiled_memory(compiled)['peak_bytes']
    release()
    return value

  stats = jax.local_devices()[0].memory_stats() or {}
  limit = int(args.memory_limit_mib * 2**20) if args.memory_limit_mib else stats.get('bytes_limit')
  mode = args.probe if args.probe != 'auto' else ('run' if stats.get('bytes_limit') and not args.memory_limit_mib
                                                  else 'plan')
  if limit is None:
    raise SystemExit('this device reports no memory limit: pass --memory-limit-mib')
  multiple = args.multiple * devices
  small, large = (int(b) * devices for b in args.line_batches.split(','))
  plan_small, plan_large = plan_at(small), plan_at(large)
  per_example = (plan_large - plan_small) / (large - small)
  fixed = plan_small - per_example * small
  predicted = int((limit - fixed) / per_example) if per_example > 0 else args.num_examples

  def fits(batch):
    if mode == 'plan':
      return plan_at(batch) <= limit
    try:
      phase, acc, order, compiled = compiled_at(batch)
      state = phase.state
      for _ in range(2):  # batches 0 and 1: the program reads its batch's place from state.step
        state, acc = compiled(state, phase.teacher_vars, split, order, acc)
      jax.block_until_ready((state, acc))
      print(f'kdjax batch {batch}: fits', flush=True)
      return True
    except Exception as error:  # noqa: BLE001 -- only allocation failures mean "does not fit"
      if _is_out_of_memory(error):
        print(f'kdjax batch {batch}: out of memory', flush=True)
        return False
      raise
    finally:
      phase = state = acc = compiled = None
      release()

  t0 = time.perf_counter()
  found = largest_fitting(fits, max(multiple, predicted), multiple, ceiling(args), args.tolerance)
  return dict(found, side='kdjax', probe=mode, predicted=predicted, limit_mib=limit / 2**20,
              plan_line=dict(fixed_mib=fixed / 2**20, per_example_mib=per_example / 2**20,
                             batches=[small, large], plan_mib=[plan_small / 2**20, plan_large / 2**20]),
              seconds=time.perf_counter() - t0, status='ran', device_kind=jax.local_devices()[0].device_kind)


# ---------------------------------------------------------------------------------------------------------------
# The peer (a child process: torch and JAX never share the GPU at once).

def peer_child(args) -> dict:
  import torch
  from benchmarks import torch_twins

  spec = importlib.util.spec_from_file_location('torch_kd_peer', args.peer)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  device = args.peer_device
  torch.backends.cudnn.benchmark = True
  alpha, temperature = parse_kd(args.kd)

  def make(name):
    model = torch_twins.resnet_twin(name, args.num_classes).to(device).to(memory_format=torch.channels_last)
    return model if args.peer_no_compile else torch.compile(model)

  teacher, student = make(args.teacher).eval(), make(args.student).train()
  opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
  size = args.image_size
  images = torch.randint(0, 256, (args.num_examples, 3, size, size), device=device).float()  # as the peer keeps it
  labels = torch.randint(0, args.num_classes, (args.num_examples,), device=device)
  mean, std = peer.MEAN.to(device), peer.STD.to(device)

  # The dtype kdjax's side computes in: bf16 autocast, or float32 throughout.
  autocast = ((lambda: torch.autocast(device, torch.bfloat16)) if args.dtype == 'bfloat16'
              else contextlib.nullcontext)

  def fits(batch):
    try:
      for _ in range(2):
        idx = torch.randperm(args.num_examples, device=device)[:batch]
        xb = peer.augment(images[idx])
        xb = ((xb - mean) / std).contiguous(memory_format=torch.channels_last)
        if not args.peer_no_compile:  # one compiled graph for every batch size, not a recompile per probe
          torch._dynamo.mark_dynamic(xb, 0)
        with autocast():
          out = student(xb)
          with torch.no_grad():
            target = teacher(xb)
          loss = peer.kd_loss(out.float(), target.float(), labels[idx], alpha, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
      if device == 'cuda':
        torch.cuda.synchronize()
      print(f'peer batch {batch}: fits', file=sys.stderr, flush=True)  # stderr: the session log, as it goes
      return True
    except (torch.OutOfMemoryError, RuntimeError) as error:
      if not isinstance(error, torch.OutOfMemoryError) and not _is_out_of_memory(error):
        raise  # cuDNN/cuBLAS report a failed allocation as a RuntimeError; anything else is a real error
      print(f'peer batch {batch}: out of memory', file=sys.stderr, flush=True)
      return False
    finally:
      opt.zero_grad(set_to_none=True)
      gc.collect()
      if device == 'cuda':
        torch.cuda.empty_cache()

  t0 = time.perf_counter()
  found = largest_fitting(fits, args.peer_start, args.multiple, ceiling(args), args.tolerance)
  cuda = device == 'cuda'
  return dict(found, side='peer', probe='run', predicted=None, seconds=time.perf_counter() - t0, status='ran',
              limit_mib=torch.cuda.get_device_properties(0).total_memory / 2**20 if cuda else None,
              device_kind=torch.cuda.get_device_name() if cuda else device)


def peer_side(args, argv) -> dict:
  """Run `peer_child` in a subprocess and parse its last JSON line; or say why the peer was skipped."""
  from benchmarks.side_by_side import cuda_torch
  if not os.path.exists(args.peer):
    return dict(side='peer', status=f'skipped: peer script {args.peer} not found')
  if importlib.util.find_spec('torch') is None or not (args.force_peer or cuda_torch()):
    return dict(side='peer', status='skipped: torch with a CUDA device is needed')
  command = [sys.executable, '-m', 'benchmarks.max_batch', *argv, '--peer-child']
  # stdout carries the result line; stderr (probe by probe, and any traceback) goes on to the caller's log.
  process = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
  lines = [line for line in process.stdout.splitlines() if line.startswith('{')]
  if process.returncode or not lines:
    return dict(side='peer', status=f'failed (exit {process.returncode}); its error is in the log above')
  return json.loads(lines[-1])


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.peer_child:
    print(json.dumps(peer_child(args)), flush=True)
    return {}
  sides = [s for s in args.sides.split(',') if s]
  unknown = set(sides) - {'peer', 'kdjax'}
  if unknown:
    raise SystemExit(f'unknown side(s) {", ".join(sorted(unknown))}; choose from peer, kdjax')
  from benchmarks import common
  rows = []
  if 'peer' in sides:  # first: JAX reserves most of the GPU's memory once it starts
    rows.append(peer_side(args, argv))
    common.write_json(args.json, dict(partial=True, sides={row['side']: row for row in rows}))  # if cut short
  if 'kdjax' in sides:
    rows.append(kdjax_side(args))
  for row in rows:
    row.update(teacher=args.teacher, student=args.student, image_size=args.image_size)
    row['probe_log'] = row.pop('probes', [])
    row['probes'] = len(row['probe_log'])
  title = (f'{args.dtype}, {args.teacher} -> {args.student}, {args.image_size} px, {args.num_examples} resident '
           'examples')
  return common.publish('max_batch', argv, args, title, rows, COLUMNS, sides={row['side']: row for row in rows},
                        xla_python_client_mem_fraction=os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))


if __name__ == '__main__':
  main()
