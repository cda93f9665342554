"""How far the KD train step is from what the hardware could do: XLA's FLOPs and bytes against measured peaks.

Why: images/s alone cannot say whether a step is slow because of the model or because of kdjax. The roofline floor
of the compiled step, max(FLOPs / matmul rate, bytes / memory bandwidth), is the time no implementation on this
device can beat; measured step time / floor says how much is left on the table and whether the step is compute- or
memory-bound. FLOPs and bytes come from XLA's cost analysis of the compiled step (per device for the sharded
program; bytes are XLA's estimate over fused operations); the rates are measured here (a large matmul in the step's
compute dtype, a large elementwise copy), not taken from a data sheet. XLA counts a convolution's multiply-adds
only where the kernel overlaps the image, not the zero padding: for ResNet-18 at 32 px that is about 13 % under
the usual 2 x MACs per convolution (a reviewer's count from the layer shapes: 8.89 vs XLA's 7.74 GFLOP for the
forward pass at batch 8), so the compute floor is that much lower and the measured/floor gap that much stricter.

  python -m benchmarks.roofline --teacher resnet18_cifar --student cnn2 --image-size 32 --batch 512 \
      --dtype bfloat16 --json roofline.json
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as `python benchmarks/roofline.py`: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from kdjax import mesh as mesh_lib  # noqa: E402

# Sizes that keep a measurement in the tens of milliseconds: big enough to reach the peak, small enough for CI.
AUTO_SIZES = {'gpu': (8192, 1024), 'tpu': (8192, 1024), 'cpu': (1024, 64)}  # (matmul n, copy MiB)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', default='resnet18_cifar')
  parser.add_argument('--student', default='cnn2')
  parser.add_argument('--phase', default='student_kd', choices=('teacher', 'student_ce', 'student_kd'))
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--augment', default='crop_flip')
  parser.add_argument('--kd', default='0.5:4', help='alpha:temperature')
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--matmul-size', type=int, default=0, help='n of the n x n matmul; 0 = by platform')
  parser.add_argument('--copy-mib', type=int, default=0, help='MiB copied to measure bandwidth; 0 = by platform')
  parser.add_argument('--repeats', type=int, default=5, help='timed repetitions of each rate measurement')
  parser.add_argument('--json', default='')
  return parser.parse_args(argv)


def matmul_rate(n: int, dtype, repeats: int) -> float:
  """FLOP/s of an n x n x n matmul on device 0 (the median of `repeats` runs of 4 back-to-back matmuls)."""
  device = jax.local_devices()[0]
  # Random operands: constant ones run faster on GPU tensor cores (less switching), which would inflate the rate.
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  seconds = common.median_time(lambda: jax.block_until_ready([matmul(a, b) for _ in range(4)]), repeats)
  return 4 * 2 * n**3 / seconds


def copy_bandwidth(mib: int, repeats: int) -> float:
  """Bytes/s of an elementwise op on device 0 that reads and writes `mib` MiB (so 2 x mib MiB move per call)."""
  device = jax.local_devices()[0]
  x = jax.device_put(jnp.ones((mib * 2**20 // 4,), jnp.float32), device)
  bump = jax.jit(lambda v: v + 1.0)
  jax.block_until_ready(bump(x))
  seconds = common.median_time(lambda: jax.block_until_ready([bump(x) for _ in range(4)]), repeats)
  return 4 * 2 * x.nbytes / seconds


def build_step(args):
  """The phase's compiled train step, its state and teacher, and a few device-resident batches."""
  images, labels, num_classes = common.synthetic_images(4 * args.batch, args.image_size)
  mesh = mesh_lib.make_data_mesh()
  dataset = common.resident(images, labels, mesh)
  preprocess = common.make_preprocess(images, common.dtype_of(args.dtype), args.augment)
  model_key, losses = common.phase_losses(common.parse_kd(args.kd))[args.phase]
  teacher = None
  if args.phase == 'student_kd':
    teacher = common.frozen_teacher(args.teacher, num_classes=num_classes, image_shape=images.shape[1:],
                                    dtype=preprocess.dtype, mesh=mesh)
  phase = common.build_phase(
      args.phase, args.teacher if model_key == 'teacher' else args.student, losses, teacher=teacher,
      num_classes=num_classes, image_shape=images.shape[1:], preprocess=preprocess,
      opt_cfg=common.peer_recipe(0.05), total_steps=args.warmup + args.steps + 1,
      dataset=dataset, batch_size=args.batch, mesh=mesh)
  order = dataset.epoch_order(0, 0)
  batches = [dataset.train_batch(order, i, args.batch) for i in range(4)]
  compiled, compile_s = common.compile_timed(phase.train_fn, phase.state, phase.teacher_vars, batches[0])
  return dict(compiled=compiled, compile_s=compile_s, phase=phase, batches=batches)


def roofline(flops: float, bytes_accessed: float, rate: float, bandwidth: float, step_s: float) -> dict:
  """The floor, which resource sets it, and how close the measured step comes to it."""
  compute_s, memory_s = flops / rate, bytes_accessed / bandwidth
  floor_s = max(compute_s, memory_s)
  return dict(compute_floor_ms=1000 * compute_s, memory_floor_ms=1000 * memory_s, floor_ms=1000 * floor_s,
              bound='compute' if compute_s >= memory_s else 'memory', measured_step_ms=1000 * step_s,
              fraction_of_floor=floor_s / step_s if step_s else None,
              arithmetic_intensity=flops / bytes_accessed if bytes_accessed else None)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.batch % jax.device_count():
    raise SystemExit(f'--batch={args.batch} must be a multiple of the device count ({jax.device_count()})')
  platform = jax.local_devices()[0].platform
  auto_n, auto_mib = AUTO_SIZES.get(platform, AUTO_SIZES['cpu'])
  n, mib = args.matmul_size or auto_n, args.copy_mib or auto_mib
  built = build_step(args)
  phase = built['phase']
  state, step_s = common.time_step_only(built['compiled'], phase.state, phase.teacher_vars, built['batches'],
                                        args.steps, args.warmup)
  del state
  costs = common.cost(built['compiled'])
  # The same count before XLA's optimisations: on GPU, convolutions become cuDNN custom calls whose FLOPs the
  # optimised program's analysis may miss (jax issues 16008, 22249); a large gap between the two flags that.
  unoptimized = common.cost(phase.train_fn.lower(phase.state, phase.teacher_vars, built['batches'][0]))
  # Simulated CPU devices share one set of cores, and one device's matmul already uses all of them: compare the
  # work of every device with that one rate. Real accelerators run their shards in parallel: per-device work.
  shared = platform == 'cpu' and jax.device_count() > 1
  scale = jax.device_count() if shared else 1
  rate = matmul_rate(n, common.dtype_of(args.dtype), args.repeats)
  bandwidth = copy_bandwidth(mib, args.repeats)
  result = roofline(costs['flops'] * scale, costs['bytes_accessed'] * scale, rate, bandwidth, step_s / args.steps)
  report = dict(common.environment('roofline', argv), benchmark='roofline', settings=vars(args),
                compile_s=built['compile_s'], flops_per_device=costs['flops'],
                flops_per_device_before_optimization=unoptimized['flops'] / jax.device_count(),  # global before
                bytes_accessed_per_device=costs['bytes_accessed'], devices_share_cores=shared,
                matmul_size=n, matmul_flops_per_s=rate, copy_mib=mib, copy_bytes_per_s=bandwidth,
                images_per_s=args.steps * args.batch / step_s, **result)
  print_report(report, args)
  common.write_json(args.json, report)
  return report


def print_report(report: dict, args) -> None:
  rows = [dict(what='step FLOPs (XLA, per device)', value=f"{report['flops_per_device'] / 1e9:.3g} GFLOP"),
          dict(what='step FLOPs before XLA optimisation (cross-check)',
               value=f"{report['flops_per_device_before_optimization'] / 1e9:.3g} GFLOP"),
          dict(what='step bytes accessed (XLA, per device)',
               value=f"{report['bytes_accessed_per_device'] / 2**20:.4g} MiB"),
          dict(what=f"matmul rate ({report['matmul_size']}², {args.dtype})",
               value=f"{report['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s"),
          dict(what=f"bandwidth ({report['copy_mib']} MiB read + write)",
               value=f"{report['copy_bytes_per_s'] / 1e9:.3g} GB/s"),
          dict(what='compute floor', value=f"{report['compute_floor_ms']:.3g} ms"),
          dict(what='memory floor', value=f"{report['memory_floor_ms']:.3g} ms"),
          dict(what=f"floor ({report['bound']}-bound)", value=f"{report['floor_ms']:.3g} ms"),
          dict(what='measured step', value=f"{report['measured_step_ms']:.3g} ms"),
          dict(what='floor / measured', value=f"{100 * report['fraction_of_floor']:.3g} %")]
  print(f"\n{args.phase} step: {args.teacher} -> {args.student}, {args.image_size} px, batch {args.batch}, "
        f"{args.dtype}; {report['device_kind']} x{report['device_count']}, jax {report['jax_version']}\n")
  print(common.markdown_table(rows, [('what', 'quantity'), ('value', 'value')]))


if __name__ == '__main__':
  main()
