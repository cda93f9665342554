"""`python main.py` user errors: one line on stderr, exit status 2, no traceback."""
import os
import runpy

import pytest

from kdjax.errors import UserError
from tests.conftest import ROOT, TINY, run_main


@pytest.mark.parametrize('variant, args, expected', [
    ('ce', ['--config.phases.train.optimiser.learning_rate=0.1'],
     'config key `phases.train.optimiser.learning_rate` does not exist (did you mean '
     '`phases.train.optimizer.learning_rate`?)'),
    ('ce', ['--config.batch_sise=64'], 'did you mean `batch_size`'),
    ('ce', ['--config.batch_size=many'], '--config.batch_size=many'),
    ('ce', ['--config.data.dataset=/nonexistent/cifar'], 'not found'),
    ('ce', ['--config.phases.train.losses.ce.kind=hinton_kd'], 'label_smoothing` is not an argument of loss `hinton_kd`'),
    ('ce', ['--config.init.keep_fresh=('], "config `init.keep_fresh` '(' is not a regular expression"),
    ('ce', ['--config.student.hidden=-1'], 'model cnn2 cannot be built with dropout=0.0, hidden=-1'),
    ('ce', ['--config.student.name=shufflenet_v2'], "model 'shufflenet_v2' does not take argument(s) hidden; it "
     'accepts: dropout, stem, width. A --config override cannot remove a `student.*` key the config file sets'),
    ('ce', ['--mode=match'], '--mode=match compares the run with a teacher; set --config.teacher.workdir'),
    ('kd', ['--config.teacher.workdir=/nonexistent/teacher'], "teacher.workdir '/nonexistent/teacher' does not exist"),
    ('kd', ['--config.teacher.workdir=/t', '--config.phases.train.losses.kd.temperature=-1'], '`temperature` must be > 0'),
    ('kd', ['--config.teacher.workdir=/t', '--config.phases.train.losses.kd.alpha=1.5'], '`alpha` must be in [0, 1]'),
])
def test_user_errors_are_one_clear_line(variant, args, expected, tmp_path):
  proc = run_main('--config', f'{TINY}:{variant}', '--workdir', str(tmp_path / 'w'), *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last


def test_missing_config_file(tmp_path):
  proc = run_main('--config', 'configs/nope.py', '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2
  assert 'configs/nope.py not found' in proc.stderr.strip().splitlines()[-1]


def test_teacher_of_the_wrong_shape_is_refused(tmp_path, teacher_workdir):
  proc = run_main('--config', f'{TINY}:kd', '--workdir', str(tmp_path / 'w'),
                  f'--config.teacher.workdir={teacher_workdir}', '--config.teacher.name=cnn2')
  assert proc.returncode == 2
  assert 'trained a cnn3, but teacher.name is cnn2' in proc.stderr.strip().splitlines()[-1]


def test_workdir_of_another_experiment_is_refused(tmp_path, teacher_workdir):
  proc = run_main('--config', f'{TINY}:ce', '--workdir', teacher_workdir)
  assert proc.returncode == 2
  assert 'holds a different experiment' in proc.stderr.strip().splitlines()[-1]


def test_check_mode_validates_without_training(tmp_path):
  """`--mode=check` refuses what training would refuse, and on a valid config writes nothing and exits 0."""
  workdir = tmp_path / 'w'
  bad = run_main('--config', f'{TINY}:kd', '--workdir', str(workdir), '--mode=check',
                 '--config.teacher.workdir=/t', '--config.phases.train.losses.kd.alpha=1.5')
  assert bad.returncode == 2 and '`alpha` must be in [0, 1]' in bad.stderr.strip().splitlines()[-1]
  good = run_main('--config', f'{TINY}:kd', '--workdir', str(workdir), '--mode=check',
                  '--config.teacher.workdir=/not/yet/trained', check=True)
  assert '"check": {"workdir": ' in good.stdout and not workdir.exists()
  assert '"teacher_not_found": ["/not/yet/trained"]' in good.stdout
  assert 'teacher.workdir /not/yet/trained does not exist yet' in good.stderr


def test_a_misspelled_key_without_config_is_one_clear_line(tmp_path):
  """The default config is loaded, with the command line's overrides, when main.py is imported."""
  proc = run_main('--config.phases.train.epoch=5', '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config key `phases.train.epoch` does not exist (did you mean `phases.train.epochs`?); see '
      'kdjax/config.py for the schema')


@pytest.mark.parametrize('args, expected', [
    (["--config.sweep.grid=phases.train.losses.kd.alpha=0.1,abc"], 'sweep cell alpha=abc'),
    (["--config.sweep.grid=phases.train.losses.kd.alpha=0.1,2"], 'sweep cell alpha=2: '),
    (["--config.sweep.grid=seed=0,1"], "sweep axis 'seed'"),
    (["--config.suite=repeats", "--config.repeats.seeds=(0,0)"], 'give distinct seeds'),
])
def test_a_suite_is_validated_before_its_first_run_trains(tmp_path, args, expected):
  workdir = tmp_path / 'w'
  proc = run_main('--config', f'{TINY}:kd', '--workdir', str(workdir), '--config.teacher.workdir=/t',
                  '--config.suite=sweep', '--config.repeats.seeds=(0,)', *args)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert expected in proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()  # nothing ran


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path):
  workdir = str(tmp_path / 'w')
  failed = run_main('--config', f'{TINY}:ce', '--workdir', workdir, '--config.data.dataset=/nonexistent/cifar')
  assert failed.returncode == 2 and 'not found' in failed.stderr.strip().splitlines()[-1]
  # The corrected command is the same experiment; the tiny run trains in seconds.
  run_main('--config', f'{TINY}:ce', '--workdir', workdir, '--config.phases.train.epochs=0.5', check=True)
  refused = run_main('--config', f'{TINY}:ce', '--workdir', workdir, '--config.data.dataset=/nonexistent/cifar')
  assert 'holds a different experiment' in refused.stderr.strip().splitlines()[-1]  # now it has checkpoints


@pytest.mark.parametrize('mode, expected', [
    ('train', 'cannot create workdir'),
    ('eval', 'train it first (the same command without --mode) or pass the --workdir of a trained run'),
])
def test_unusable_workdirs_are_one_clear_line(tmp_path, mode, expected):
  workdir = tmp_path / 'w'
  if mode == 'train':
    workdir.write_text('a file, not a folder')
  else:  # a workdir with a recorded config but no checkpoint
    workdir.mkdir()
    run_main('--config', f'{TINY}:ce', '--workdir', str(workdir), '--config.data.dataset=/nonexistent/cifar')
    (workdir / 'data.json').write_text('{"class_names": ["0"], "image_shape": [8, 8, 1], "mean": [0], "std": [1]}')
  proc = run_main('--config', f'{TINY}:ce', '--workdir', str(workdir), f'--mode={mode}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert expected in proc.stderr.strip().splitlines()[-1]


def test_each_config_variant_gets_its_own_default_workdir(tmp_path):
  """`:smoke` must not land in the full run's workdir, where students look for their teacher; the arguments' order
  does not matter; and each config's default teacher.workdir is the default workdir of its teacher command."""
  from kdjax.config import default_workdir
  assert default_workdir('configs/cifar10_teacher.py') == 'workdirs/cifar10_teacher'
  assert default_workdir('configs/cifar10_teacher.py', 'smoke') == 'workdirs/cifar10_teacher_smoke'
  assert (default_workdir('configs/cifar100_benchmark.py', 'teacher,cifar10')
          == default_workdir('configs/cifar100_benchmark.py', 'cifar10,teacher')
          == 'workdirs/cifar100_benchmark_cifar10_teacher')
  from configs import cifar10_kd, cifar10_methods, cifar10_stagewise, cifar10_vgg19_kd, cifar100_benchmark, mnist_kd
  from configs import imagenette_stagewise, tiny_imagenet_kd
  for student, (teacher_file, teacher_arg) in [
      (cifar10_kd.get_config(), ('cifar10_teacher.py', '')),
      (cifar10_kd.get_config('smoke'), ('cifar10_teacher.py', 'smoke')),
      (cifar10_vgg19_kd.get_config('5'), ('cifar10_vgg19_kd.py', 'teacher')),
      (mnist_kd.get_config('mlp_from_resnet164'), ('mnist_kd.py', 'teacher_resnet164')),
      (cifar100_benchmark.get_config('kd'), ('cifar100_benchmark.py', 'teacher')),
      (cifar100_benchmark.get_config('dkd,cifar10'), ('cifar100_benchmark.py', 'cifar10,teacher')),
      (tiny_imagenet_kd.get_config('kd'), ('tiny_imagenet_kd.py', 'teacher')),
      (tiny_imagenet_kd.get_config('smoke,kd'), ('tiny_imagenet_kd.py', 'smoke,teacher')),
      (imagenette_stagewise.get_config('smoke'), ('imagenette_teacher.py', 'smoke')),
      (cifar10_methods.get_config('crd'), ('cifar10_teacher.py', 'resnet20_cpu')),
      (cifar10_stagewise.get_config('repeats'), ('cifar10_teacher.py', 'resnet20_cpu'))]:
    assert student.teacher.workdir == default_workdir(teacher_file, teacher_arg), (teacher_file, teacher_arg)
  # main.py uses the same function when --workdir is left out.
  proc = run_main('--config', f'{TINY}:ce', '--mode=check', check=True)
  assert f'"workdir": "{default_workdir(TINY, "ce")}"' in proc.stdout


@pytest.mark.parametrize('env, expected', [
    ({'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': None},
     'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES set but not JAX_PROCESS_ID'),
    ({'JAX_COORDINATOR_ADDRESS': None, 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'},
     'JAX_NUM_PROCESSES, JAX_PROCESS_ID set but not JAX_COORDINATOR_ADDRESS'),
    ({'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': 'one'},
     "JAX_PROCESS_ID='one': a multi-process run needs"),
])
def test_an_incomplete_multi_process_environment_is_one_clear_line(tmp_path, env, expected):
  """Anything short of all three variables would let each process train alone into the same workdir."""
  proc = run_main('--config', f'{TINY}:ce', '--workdir', str(tmp_path / 'w'), env=env)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert expected in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / 'w').exists()


def test_eval_of_a_suite_workdir_names_its_runs(tmp_path):
  """A repeats or sweep workdir holds runs, not a model: the error lists them."""
  for run in ('seed_0', 'seed_1'):
    (tmp_path / 'suite' / run).mkdir(parents=True)
    (tmp_path / 'suite' / run / 'data.json').write_text('{}')
  proc = run_main('--config', f'{TINY}:ce', '--workdir', str(tmp_path / 'suite'), '--mode=eval')
  assert proc.returncode == 2 and 'it holds the runs seed_0, seed_1: pass one' in proc.stderr.strip().splitlines()[-1]


def test_ctrl_c_says_how_to_resume(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  workdir = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), '--config', f'{TINY}:ce', '--workdir',
                           str(workdir), '--config.phases.train.epochs=200'], cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  deadline = time.time() + 120
  while not (workdir / 'checkpoints').exists() and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  try:
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()  # a no-op once it has exited; a 200-epoch run must not outlive a failed test
  assert proc.returncode == 130 and 'Traceback' not in stderr, stderr[-2000:]
  assert stderr.strip().splitlines()[-1] == (
      f'interrupted; the same command resumes from the latest checkpoint in {workdir}')


def test_an_argument_the_config_does_not_take_is_one_clear_line(tmp_path):
  proc = run_main('--config', 'configs/cifar100_benchmark.py:dkdd', '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  # The file's arguments, in the order it declares them: its two switches, then each method it runs.
  methods = runpy.run_path(os.path.join(ROOT, 'configs', 'cifar100_benchmark.py'))['METHOD_LOSSES']
  takes = ', '.join(['teacher', 'cifar10', *methods])
  assert 'fitnets' in takes  # the listing reads the methods table, not a copy of it
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config argument(s) 'dkdd' not understood; this config file takes {takes} (comma-separated)")


def test_a_launcher_completes_a_partial_multi_process_environment(monkeypatch):
  """Under SLURM (or Open MPI) the coordinator address alone is enough: jax.distributed reads the rest itself."""
  from kdjax import mesh
  calls = []
  monkeypatch.setattr(mesh.jax.distributed, 'initialize', lambda *args, **kwargs: calls.append(kwargs))
  _srun_task(monkeypatch)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.delenv('JAX_NUM_PROCESSES', raising=False)
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  monkeypatch.setattr(mesh.jax.config, 'update', lambda *args: None)  # the collectives of a backend already built
  mesh.maybe_initialize_distributed()
  assert calls == [{}]


def _srun_task(monkeypatch):
  """The variables srun sets for task 0 of 2 (an allocation alone sets SLURM_JOB_ID and SLURM_NTASKS)."""
  for name, value in (('SLURM_JOB_ID', '7'), ('SLURM_NTASKS', '2'), ('SLURM_STEP_NODELIST', 'node[1-2]'),
                      ('SLURM_PROCID', '0'), ('SLURM_LOCALID', '0')):
    monkeypatch.setenv(name, value)


def _no_launch_variables(monkeypatch):
  for name in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID',
               'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'OMPI_MCA_orte_hnp_uri', 'JAX_COORDINATOR_ADDRESS',
               'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)


def test_a_slurm_allocation_without_srun_runs_one_process(monkeypatch):
  """`python main.py` in an `salloc -n 4` shell is one process: joining a 4-process run would fail (no step nodes)."""
  from kdjax import mesh
  _no_launch_variables(monkeypatch)
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.setattr(mesh.jax.distributed, 'initialize', lambda *a, **k: pytest.fail('joined a multi-process run'))
  mesh.maybe_initialize_distributed()


def test_open_mpi_5_asks_for_the_explicit_variables(monkeypatch):
  from kdjax import mesh
  _no_launch_variables(monkeypatch)
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '2')
  monkeypatch.setenv('OMPI_COMM_WORLD_RANK', '1')
  with pytest.raises(UserError, match='JAX_PROCESS_ID=\\$OMPI_COMM_WORLD_RANK'):
    mesh.maybe_initialize_distributed()


def test_a_launch_jax_cannot_read_is_one_user_error(monkeypatch):
  from kdjax import mesh

  def refuse(**kwargs):
    raise ValueError('coordinator_address should be defined.')
  _no_launch_variables(monkeypatch)
  _srun_task(monkeypatch)
  monkeypatch.setattr(mesh.jax.distributed, 'initialize', refuse)
  monkeypatch.setattr(mesh.jax.config, 'update', lambda *args: None)
  with pytest.raises(UserError, match='coordinator_address should be defined.*set JAX_COORDINATOR_ADDRESS'):
    mesh.maybe_initialize_distributed()


def test_multi_process_replication_places_typed_keys(monkeypatch):
  """Across processes `replicate` fills each process's devices from its own copy: a dropout layer's typed key (no
  NumPy form) goes as its raw data and comes back a key of the same implementation."""
  import jax
  import numpy as np
  from kdjax import mesh
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  key = jax.random.key(3)
  placed = mesh.replicate({'key': key, 'x': np.arange(4.0)}, mesh.make_data_mesh())
  assert jax.dtypes.issubdtype(placed['key'].dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(placed['key']) == jax.random.key_impl(key)
  np.testing.assert_array_equal(jax.random.key_data(placed['key']), jax.random.key_data(key))
  np.testing.assert_array_equal(placed['x'], np.arange(4.0))
  assert placed['x'].sharding.is_fully_replicated and len(placed['x'].sharding.device_set) == jax.device_count()


def test_a_bad_metric_writer_in_the_environment_stops_before_any_work(tmp_path):
  workdir = tmp_path / 'w'
  proc = run_main('--config', f'{TINY}:ce', '--workdir', str(workdir), env={'KDJAX_METRIC_WRITER': 'tb'})
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert "KDJAX_METRIC_WRITER='tb' is not a metric writer; set it to one of auto, clu, tensorboard" in \
      proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()
