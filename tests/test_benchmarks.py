"""The benchmark scripts run end to end at the tiniest sizes on 8 simulated devices and write the JSON the README
describes. Speeds are never asserted (they depend on the machine); only that every figure exists and is positive."""
import json
import os
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from benchmarks import bench_steps, max_batch, roofline, side_by_side

TINY_MODELS = ['--teacher', 'cnn3', '--student', 'cnn2', '--dtype', 'float32']
ENVIRONMENT_KEYS = {'device_kind', 'platform', 'device_count', 'jax_version', 'date', 'command', 'settings'}


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope='module')
def tiny_archive(tmp_path_factory):
  """An image-folder .tar.gz like the shared CIFAR one: tiny/{train,test}/<class>/*.png, 2 classes, 16 px."""
  root = tmp_path_factory.mktemp('tiny_data')
  rng = np.random.default_rng(0)
  for split, count in (('train', 32), ('test', 8)):
    for name in ('a', 'b'):
      folder = root / 'tiny' / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  path = root / 'tiny.tar.gz'
  with tarfile.open(path, 'w:gz') as tar:
    tar.add(root / 'tiny', arcname='tiny')
  return str(path)


def _read(path) -> dict:
  with open(path) as f:
    return json.load(f)


def test_bench_steps_reports_every_phase(tmp_path):
  out = tmp_path / 'steps.json'
  bench_steps.main([*TINY_MODELS, '--image-size', '16', '--batch', '16', '--steps', '2', '--warmup', '1',
                    '--num-examples', '32', '--json', str(out)])
  report = _read(out)
  assert ENVIRONMENT_KEYS <= set(report) and report['device_count'] == 8
  assert set(report['phases']) == {'teacher', 'student_ce', 'student_kd'}
  assert [report['phases'][p]['model'] for p in ('teacher', 'student_ce', 'student_kd')] == ['cnn3', 'cnn2', 'cnn2']
  for row in report['phases'].values():
    for key in ('compile_s', 'images_per_s', 'step_ms', 'step_images_per_s', 'eval_compile_s', 'eval_images_per_s',
                'xla_peak_bytes'):
      assert _positive(row[key]), (row['phase'], key, row[key])
    assert row['peak_bytes'] is None or _positive(row['peak_bytes'])  # None where the backend reports nothing (CPU)


def test_bench_steps_times_the_cached_kd_step(tmp_path):
  report = bench_steps.main([*TINY_MODELS, '--image-size', '16', '--batch', '16', '--steps', '2', '--warmup', '1',
                             '--num-examples', '32', '--augment', 'flip', '--phases', 'student_kd_cached'])
  row = report['phases']['student_kd_cached']
  assert _positive(row['cache_build_s']) and _positive(row['images_per_s']) and _positive(row['eval_images_per_s'])
  with pytest.raises(SystemExit, match='teacher.cache needs an augmentation with a finite set of views'):
    bench_steps.main([*TINY_MODELS, '--image-size', '16', '--batch', '16', '--steps', '1', '--warmup', '1',
                      '--num-examples', '32', '--augment', 'random_resized_crop', '--phases', 'student_kd_cached'])


def test_bench_steps_reads_a_dataset_path(tiny_archive, tmp_path):
  report = bench_steps.main([*TINY_MODELS, '--image-size', '0', '--batch', '16', '--steps', '1', '--warmup', '1',
                             '--dataset', tiny_archive, '--cache-dir', str(tmp_path / 'cache'),
                             '--phases', 'student_ce'])
  assert report['image_shape'] == [16, 16, 3] and report['num_examples'] == 64
  assert _positive(report['phases']['student_ce']['images_per_s'])


def test_roofline_reports_floor_and_measurement(tmp_path):
  out = tmp_path / 'roofline.json'
  roofline.main([*TINY_MODELS, '--image-size', '16', '--batch', '16', '--steps', '2', '--warmup', '1',
                 '--matmul-size', '128', '--copy-mib', '4', '--repeats', '2', '--json', str(out)])
  report = _read(out)
  assert ENVIRONMENT_KEYS <= set(report)
  for key in ('flops_per_device', 'bytes_accessed_per_device', 'matmul_flops_per_s', 'copy_bytes_per_s',
              'compute_floor_ms', 'memory_floor_ms', 'floor_ms', 'measured_step_ms', 'fraction_of_floor',
              'images_per_s', 'compile_s'):
    assert _positive(report[key]), (key, report[key])
  assert report['bound'] in ('compute', 'memory')
  assert report['floor_ms'] == max(report['compute_floor_ms'], report['memory_floor_ms'])
  # On CPU the optimised program keeps its convolutions' FLOPs: the cross-check agrees within a factor of 2.
  assert 0.5 < report['flops_per_device_before_optimization'] / report['flops_per_device'] < 2


FAKE_PEER = textwrap.dedent('''\
    """Stands in for torch_kd_peer.py: records its arguments, prints the peer's JSON lines."""
    import json, sys
    with open(sys.argv[0] + '.args', 'w') as f:
      json.dump(sys.argv[1:], f)
    print('compiling...')
    for phase, acc, img_s in (('teacher', 0.9, 1000.0), ('student_ce', 0.7, 4000.0), ('student_kd', 0.72, 2000.0)):
      print(json.dumps(dict(phase=phase, test_acc=acc, wall_s=3.0, train_img_per_s=img_s)))
    print(json.dumps(dict(phase='summary', teacher=0.9, student_ce=0.7, student_kd=0.72)))
    ''')


def test_side_by_side_compares_kdjax_with_the_peer(tiny_archive, tmp_path):
  peer = tmp_path / 'fake_peer.py'
  peer.write_text(FAKE_PEER)
  out = tmp_path / 'side_by_side.json'
  side_by_side.main(['--data', tiny_archive, '--peer', str(peer), '--force-peer', *TINY_MODELS, '--batch', '16',
                     '--epochs-teacher', '2', '--epochs-student', '2', '--kd', '0.5:4:0.05',
                     '--cache-dir', str(tmp_path / 'cache'), '--workdir', str(tmp_path / 'runs'),
                     '--json', str(out)])
  report = _read(out)
  assert report['peer']['status'] == 'ran'
  peer_args = _read(str(peer) + '.args')
  assert peer_args[peer_args.index('--batch') + 1] == '16' and peer_args[peer_args.index('--kd') + 1] == '0.5:4:0.05'
  for name in ('teacher', 'student_ce', 'student_kd'):
    summary, row = report['kdjax'][name], report['phases'][name]
    assert summary['steps'] == 8 and 0 <= summary['eval_top1'] <= 1
    for key in ('kdjax_images_per_s', 'peer_images_per_s', 'images_per_s_ratio', 'kdjax_wall_s', 'kdjax_compile_s'):
      assert _positive(row[key]), (name, key, row[key])
    assert row['images_per_s_ratio'] == pytest.approx(row['kdjax_images_per_s'] / row['peer_images_per_s'])


@pytest.mark.parametrize('flags, reason', [
    (['--peer', '/nonexistent/peer.py'], 'not found'),
    (['--epochs-teacher', '0.5'], 'whole epochs'),
    (['--epochs-student', '1'], 'at least 2'),  # the peer times every epoch after the first
    (['--skip-peer'], '--skip-peer'),
])
def test_side_by_side_says_why_the_peer_is_skipped(tmp_path, flags, reason):
  peer = tmp_path / 'peer.py'
  peer.write_text('')
  args = side_by_side.parse_args(['--data', 'unused', '--peer', str(peer), *flags])
  assert reason in side_by_side.peer_skip_reason(args)


def test_side_by_side_finds_the_eval_split(tiny_archive):
  assert side_by_side.eval_split_of(tiny_archive) == 'test'


def test_scripts_run_by_path():
  """`python benchmarks/NAME.py --help` works without installing kdjax (the GPU machine runs them this way)."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in ('bench_steps', 'roofline', 'side_by_side', 'max_batch'):
    proc = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', f'{name}.py'), '--help'],
                          capture_output=True, text=True, cwd='/', timeout=60)
    assert proc.returncode == 0 and 'usage' in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize('limit, guess, tolerance', [
    (1000, 64, 0.0), (1000, 5000, 0.0), (1000, 1000, 0.05), (1003, 8, 0.05), (8, 512, 0.0), (4096, 4096, 0.0)])
def test_largest_fitting_brackets_the_limit(limit, guess, tolerance):
  found = max_batch.largest_fitting(lambda b: b <= limit, guess, multiple=8, ceiling=4096, tolerance=tolerance)
  batch, first_failing = found['batch'], found['first_failing']
  assert batch % 8 == 0 and batch <= limit
  assert dict(found['probes'])[batch] is True
  if limit >= 4096:
    assert batch == 4096 and first_failing is None
  else:
    assert first_failing > limit and dict(found['probes'])[first_failing] is False
    assert first_failing - batch <= max(8, tolerance * batch)
  if tolerance == 0:
    assert batch == limit - limit % 8
  assert len(found['probes']) <= 20


def test_largest_fitting_reports_zero_when_nothing_fits():
  found = max_batch.largest_fitting(lambda b: False, 256, multiple=8, ceiling=1024, tolerance=0.05)
  assert found['batch'] == 0 and found['first_failing'] == 8


def test_max_batch_kdjax_side_finds_where_the_xla_plan_crosses_the_limit(tmp_path):
  """With a limit between the plans at the 2 line batches, the answer lies between them; every probe's verdict is
  the plan against the limit (checked again here by compiling at the answer and at the first failing batch)."""
  out = tmp_path / 'max_batch.json'
  args = [*TINY_MODELS, '--image-size', '16', '--num-examples', '512', '--sides', 'kdjax', '--line-batches', '2,4',
          '--multiple', '1', '--tolerance', '0']
  probe = max_batch.main([*args, '--memory-limit-mib', '1e6'])['sides']['kdjax']
  line = probe['plan_line']
  assert line['per_example_mib'] > 0 and probe['batch'] == 512 and probe['first_failing'] is None
  limit = line['fixed_mib'] + line['per_example_mib'] * 100.5  # between the plans at global batches 96 and 104
  row = max_batch.main([*args, '--memory-limit-mib', str(limit), '--json', str(out)])['sides']['kdjax']
  assert row['probe'] == 'plan' and row['batch'] % 8 == 0 and row['first_failing'] - row['batch'] == 8
  assert 80 <= row['batch'] <= 112 and row['predicted'] in range(96, 105)
  report = _read(out)
  assert ENVIRONMENT_KEYS <= set(report) and report['sides']['kdjax']['batch'] == row['batch']


def test_max_batch_run_probe_runs_the_train_program(tmp_path):
  """`--probe run` (the default on a GPU) runs two real steps at each probed batch: here everything fits."""
  row = max_batch.main([*TINY_MODELS, '--image-size', '8', '--num-examples', '128', '--sides', 'kdjax', '--probe',
                        'run', '--memory-limit-mib', '1e6', '--line-batches', '8,16', '--multiple', '1'])['sides']['kdjax']
  assert row['probe'] == 'run' and row['batch'] == 128 and row['first_failing'] is None


FAKE_PEER_MODULE = textwrap.dedent('''\
    """Stands in for torch_kd_peer.py's kd_loss, augment, MEAN and STD (the max_batch peer probe imports them)."""
    import torch
    import torch.nn.functional as F
    MEAN = torch.full((1, 3, 1, 1), 127.0)
    STD = torch.full((1, 3, 1, 1), 64.0)
    def augment(x):
      return x.flip(3)
    def kd_loss(s, t, y, alpha, temp):
      soft = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction='batchmean') * temp * temp
      return (1 - alpha) * F.cross_entropy(s, y) + alpha * soft
    ''')


def test_max_batch_peer_side_runs_the_peer_step_on_twins(tmp_path):
  """On a CPU nothing runs out of memory, so the search ends at --max-batch; this checks that the child process
  builds the twins, runs the peer's step and reports back."""
  pytest.importorskip('torch')
  peer = tmp_path / 'peer.py'
  peer.write_text(FAKE_PEER_MODULE)
  report = max_batch.main(['--sides', 'peer', '--peer', str(peer), '--force-peer', '--peer-device', 'cpu',
                           '--peer-no-compile', '--teacher', 'resnet18', '--student', 'resnet34_small',
                           '--image-size', '32', '--num-examples', '16', '--max-batch', '16', '--peer-start', '8'])
  row = report['sides']['peer']
  assert row['status'] == 'ran', row['status']
  assert row['batch'] == 16 and row['first_failing'] is None and row['probes'] == 2


def test_max_batch_says_why_the_peer_is_skipped(tmp_path):
  row = max_batch.main(['--sides', 'peer', '--peer', str(tmp_path / 'missing.py')])['sides']['peer']
  assert row['status'].startswith('skipped') and 'not found' in row['status']


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet34_medium', 'resnet34_small', 'plain34_smallest'])
def test_torch_twins_match_kdjax_parameter_counts(name):
  pytest.importorskip('torch')
  import jax
  from flax import nnx
  from benchmarks import torch_twins
  from kdjax.models import create_model
  twin = torch_twins.resnet_twin(name, 10)
  model = create_model(name, num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  kdjax_count = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert sum(p.numel() for p in twin.parameters()) == kdjax_count
  assert twin(__import__('torch').zeros(2, 3, 32, 32)).shape == (2, 10)


def test_max_batch_reads_every_allocation_failure_as_does_not_fit():
  from benchmarks import max_batch
  for message in ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate', 'CUDA out of memory. Tried to',
                  'cuDNN error: CUDNN_STATUS_ALLOC_FAILED', 'CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate'):
    assert max_batch._is_out_of_memory(RuntimeError(message)), message
  assert not max_batch._is_out_of_memory(RuntimeError('CUDNN_STATUS_BAD_PARAM'))
