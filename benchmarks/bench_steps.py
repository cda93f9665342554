"""Compile time, steady-state train and eval images/s, and memory of kdjax's three KD-experiment phases.

Why: an end-to-end run mixes compilation, evaluation, checkpoints and logging into one number; this script times
each jitted step on its own, on the path training uses (device-resident `ResidentDataset`, augmentation inside the
real `kdjax.steps.train_step`, the 1-D data mesh of all local devices), so a regression shows up in the step that
caused it. Phases:
  teacher     the teacher model trained on labels (CE)
  student_ce  the student trained on labels (CE)
  student_kd  the student trained with Hinton KD: frozen teacher forward + student step
  student_kd_cached  the same KD step with the teacher's logits looked up (`kdjax.teacher_cache`; not in the
              default set: building the table costs one teacher forward pass per augmentation view, reported as
              cache_build_s, and needs a finite-view --augment)
For each: compile seconds of the train step, train images/s of the loop as `kdjax.train` runs it (the fused gather
+ step + metric program, metrics read at log steps), images/s of the bare step alone on pre-gathered batches, eval compile seconds and images/s, and memory (the runtime's peak where the backend reports it, else null; XLA's buffer plan always).

  python -m benchmarks.bench_steps --teacher resnet18_cifar --student cnn2 --image-size 32 --batch 512 \
      --dtype bfloat16 --steps 50 --warmup 5 --dataset synthetic --json bench_steps.json
"""
import argparse
import dataclasses
import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/bench_steps.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from kdjax import mesh as mesh_lib  # noqa: E402
from kdjax import steps  # noqa: E402

PHASES = ('teacher', 'student_ce', 'student_kd', 'student_kd_cached')
DEFAULT_PHASES = PHASES[:3]
COLUMNS = [('phase', 'phase'), ('model', 'model'), ('compile_s', 'compile s'), ('images_per_s', 'train img/s'),
           ('step_ms', 'step ms'), ('step_images_per_s', 'step-only img/s'), ('eval_compile_s', 'eval compile s'),
           ('eval_images_per_s', 'eval img/s'), ('peak_mib', 'peak MiB (runtime)'),
           ('xla_peak_mib', 'peak MiB (XLA plan)'), ('cache_build_s', 'cache build s')]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', default='resnet18_cifar')
  parser.add_argument('--student', default='cnn2')
  parser.add_argument('--image-size', type=int, default=32, help='0 keeps a dataset\'s stored size')
  parser.add_argument('--batch', type=int, default=512, help='global batch, split over all devices')
  parser.add_argument('--eval-batch', type=int, default=0, help='0 = --batch')
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--steps', type=int, default=50, help='timed steps per phase')
  parser.add_argument('--warmup', type=int, default=5, help='untimed steps before timing')
  parser.add_argument('--log-every', type=int, default=50, help='the loop reads metrics every this many steps '
                      '(config log_every_steps)')
  parser.add_argument('--dataset', default='synthetic', help='synthetic, or any kdjax dataset source (its train split)')
  parser.add_argument('--num-examples', type=int, default=10_000, help='resident examples (train and eval pass)')
  parser.add_argument('--augment', default='crop_flip', help='kdjax.data.augment.AUGMENTATIONS name')
  parser.add_argument('--kd', default='0.5:4', help='alpha:temperature of the Hinton KD phase')
  parser.add_argument('--phases', default=','.join(DEFAULT_PHASES),
                      help='comma-separated subset of ' + ','.join(PHASES))
  parser.add_argument('--cache-dir', default='', help='kdjax decode cache for --dataset PATH')
  parser.add_argument('--json', default='', help='write the figures here')
  return parser.parse_args(argv)


def check_args(args) -> None:
  """Fail before any compilation on settings the mesh or the dataset cannot take."""
  devices = jax.device_count()
  for flag, value in (('--batch', args.batch), ('--eval-batch', args.eval_batch)):
    if value <= 0 or value % devices:
      raise SystemExit(f'{flag}={value} must be a positive multiple of the device count ({devices})')
  unknown = set(args.phases) - set(PHASES)
  if unknown:
    raise SystemExit(f'unknown phase(s) {", ".join(sorted(unknown))}; choose from {", ".join(PHASES)}')


def measure_phase(name: str, args, data, teacher) -> dict:
  """Compile, time the training loop and the bare step, then compile and time one eval pass."""
  model_key, losses = common.phase_losses(common.parse_kd(args.kd))[name]
  model = args.teacher if model_key == 'teacher' else args.student
  phase_teacher, cache_build_s = None, None
  if name == 'student_kd':
    phase_teacher = teacher
  elif name == 'student_kd_cached':
    phase_teacher, cache_build_s = common.cached_teacher(teacher, data['dataset'], args.augment, data['preprocess'],
                                                         args.batch)
  phase = common.build_phase(
      name, model, losses, teacher=phase_teacher, num_classes=data['num_classes'],
      image_shape=data['image_shape'], preprocess=data['preprocess'], opt_cfg=common.peer_recipe(0.05),
      total_steps=args.warmup + 2 * args.steps + 1, dataset=data['dataset'], batch_size=args.batch,
      mesh=data['mesh'], eval_teacher=teacher if phase_teacher is not None else None,
      eval_batch_size=args.eval_batch)
  dataset = data['dataset']
  order = dataset.epoch_order(0, 0)
  batches = [dataset.train_batch(order, i, args.batch) for i in range(min(4, dataset.steps_per_epoch(args.batch)))]
  train_step, compile_s = common.compile_timed(phase.train_fn, phase.state, phase.teacher_vars, batches[0])
  state, loop_s = common.time_train(phase, phase.state, dataset, args.batch, args.steps, args.warmup,
                                    args.log_every)
  state, step_s = common.time_step_only(train_step, state, phase.teacher_vars, batches, args.steps, 1)
  compiled, eval_compile_s = common.compile_timed(
      phase.eval_program.fn, state.params, state.model_state, phase.eval_teacher_vars,
      (dataset.images, dataset.labels), *steps.eval_start(phase.eval_program, dataset.mesh))
  eval_program = dataclasses.replace(phase.eval_program, fn=compiled)
  common.eval_pass(phase, state, dataset, eval_program)  # warm-up pass
  eval_s = common.eval_pass(phase, state, dataset, eval_program)
  memory = common.compiled_memory(train_step)
  return dict(phase=name, model=model, compile_s=compile_s, cache_build_s=cache_build_s, images_per_s=args.steps * args.batch / loop_s,
              step_ms=1000 * loop_s / args.steps, step_images_per_s=args.steps * args.batch / step_s,
              eval_compile_s=eval_compile_s, eval_images_per_s=dataset.num_examples / eval_s,
              peak_bytes=common.peak_device_bytes(), peak_mib=common.mib(common.peak_device_bytes()),
              xla_peak_bytes=memory['peak_bytes'], xla_peak_mib=common.mib(memory['peak_bytes']),
              xla_temp_bytes=memory['temp_bytes'], xla_argument_bytes=memory['argument_bytes'])


def load_data(args) -> dict:
  """The resident dataset, its preprocessing and shapes, and the mesh, shared by every phase."""
  num_examples = max(args.num_examples, args.batch, args.eval_batch)
  images, labels, num_classes = common.load_images(args.dataset, args.image_size, num_examples, args.cache_dir)
  if len(labels) < args.batch:
    raise SystemExit(f'{args.dataset} has {len(labels)} training examples, fewer than --batch={args.batch}')
  mesh = mesh_lib.make_data_mesh()
  return dict(mesh=mesh, dataset=common.resident(images, labels, mesh), num_classes=num_classes,
              image_shape=images.shape[1:],
              preprocess=common.make_preprocess(images, common.dtype_of(args.dtype), args.augment))


def main(argv=None) -> dict:
  args = parse_args(argv)
  args.eval_batch = args.eval_batch or args.batch
  args.phases = [p for p in args.phases.split(',') if p]
  check_args(args)
  data = load_data(args)
  teacher = None
  if {'student_kd', 'student_kd_cached'} & set(args.phases):
    teacher = common.frozen_teacher(args.teacher, num_classes=data['num_classes'], image_shape=data['image_shape'],
                                    dtype=common.dtype_of(args.dtype), mesh=data['mesh'])
  rows = [measure_phase(name, args, data, teacher) for name in args.phases]
  return common.publish('bench_steps', argv, args, f'{args.dtype}, batch {args.batch}, {data["image_shape"][0]} px, '
                        f'{args.dataset}', rows, COLUMNS, num_examples=data['dataset'].num_examples,
                        image_shape=list(data['image_shape']), phases={row['phase']: row for row in rows})


if __name__ == '__main__':
  main()
