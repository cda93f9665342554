"""Sweeps and repeats end to end on a tiny CPU budget, including kill-and-resume and the results tables."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kdjax import report
from kdjax.errors import NonFiniteError
from tests.conftest import ROOT, TINY


def test_mean_std_against_hand_computed_numbers():
  mean, std = report.mean_std([0.90, 0.92, 0.94])
  assert mean == pytest.approx(0.92)
  assert std == pytest.approx(0.02)  # sqrt(((-.02)^2 + 0 + .02^2) / 2)
  assert report.mean_std([0.5]) == (0.5, 0.0)


def test_results_table(tmp_path):
  rows = [dict(name='seed_0', best_eval_top1=0.9, eval_top1=0.89),
          dict(name='seed_1', best_eval_top1=0.94, eval_top1=0.93)]
  markdown, _ = report.write_results(str(tmp_path), 't', rows)
  assert '| seed_1 | 94.00 | 93.00 |' in markdown
  assert '**92.00 ± 2.83**' in markdown  # std of (90, 94) = 2.83
  data = json.load(open(tmp_path / 'results.json'))
  assert data['best_eval_top1']['mean'] == pytest.approx(0.92)
  assert 'held-out' not in markdown and 'heldout_top1' not in data


def test_repeats_record_a_diverged_seed_and_give_no_mean(tmp_path, monkeypatch):
  """Seed 1 diverges: seeds 0 and 2 still run, its row says so, and the recipe gets no mean."""
  from kdjax import suites, train
  from tests.tiny_configs import tiny

  def fake_train(child, child_dir):
    if child.seed == 1:
      raise NonFiniteError('non-finite loss at step 3')
    return dict(best_eval_top1=0.9 + child.seed / 100, eval_top1=0.9)
  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  cfg = tiny.get_config('ce')
  cfg.suite, cfg.repeats.seeds = 'repeats', (0, 1, 2)
  assert suites.run_repeats(cfg, str(tmp_path))['best_eval_top1_mean'] is None
  markdown = open(tmp_path / 'results.md').read()
  assert '| seed_1 | diverged | diverged |' in markdown and '| seed_2 | 92.00 | 90.00 |' in markdown
  assert '**diverged (1 of 3 seeds)**' in markdown
  assert json.load(open(tmp_path / 'results.json'))['best_eval_top1'] == dict(mean=None, std=None)


def test_results_table_has_the_held_out_column_in_subset_mode(tmp_path):
  rows = [dict(name='seed_0', best_eval_top1=0.9, eval_top1=0.89, heldout_top1=0.80),
          dict(name='seed_1', best_eval_top1=0.94, eval_top1=0.93, heldout_top1=0.86),
          dict(name='seed_2', best_eval_top1=0.92, eval_top1=0.91, heldout_top1=0.83)]
  markdown, _ = report.write_results(str(tmp_path), 't', rows)
  assert '| run | best eval top-1 (%) | last eval top-1 (%) | held-out top-1 (%) |' in markdown
  assert '| seed_1 | 94.00 | 93.00 | 86.00 |' in markdown
  assert '**83.00 ± 3.00**' in markdown  # held-out (80, 86, 83): mean 83, std sqrt((9 + 9 + 0) / 2) = 3
  data = json.load(open(tmp_path / 'results.json'))
  assert data['heldout_top1']['mean'] == pytest.approx(0.83)
  assert data['heldout_top1']['std'] == pytest.approx(0.03)


def test_repeats_in_subset_mode_report_the_held_out_rest_of_the_training_split(tmp_path):
  from kdjax import suites
  from tests.tiny_configs import tiny
  cfg = tiny.get_config('ce')
  cfg.suite, cfg.repeats.seeds = 'repeats', (0, 1)
  cfg.data.train_split, cfg.data.heldout_split = 'train[:25%]', 'train[25%:]'
  cfg.phases.train.epochs = 2.0
  suites.run_repeats(cfg, str(tmp_path))
  summaries = [json.load(open(tmp_path / f'seed_{seed}' / 'summary.json')) for seed in (0, 1)]
  held_out = [s['heldout_top1'] for s in summaries]
  assert all(0.0 < h <= 1.0 for h in held_out)
  results = json.load(open(tmp_path / 'results.json'))
  assert results['heldout_top1']['mean'] == pytest.approx(np.mean(held_out))
  assert f'| seed_1 | {report.pct(summaries[1]["best_eval_top1"])} | {report.pct(summaries[1]["eval_top1"])} | ' \
         f'{report.pct(held_out[1])} |' in open(tmp_path / 'results.md').read()


@pytest.mark.long
def test_sweep_is_killed_and_resumed_without_redoing_finished_runs(tmp_path, teacher_workdir):
  workdir = str(tmp_path / 'sweep')
  args = [sys.executable, os.path.join(ROOT, 'main.py'), '--config', f'{TINY}:kd', '--workdir', workdir,
          '--config.suite=sweep', '--config.repeats.seeds=(0, 1)', f'--config.teacher.workdir={teacher_workdir}',
          '--config.sweep.grid=phases.train.losses.kd.alpha=0.1,0.9;phases.train.losses.kd.temperature=4.0',
          '--config.phases.train.epochs=1']
  first_run = os.path.join(workdir, 'alpha=0.1,temperature=4.0', 'seed_0', 'summary.json')
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not os.path.exists(first_run) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(first_run)
  mtime = os.path.getmtime(first_run)
  done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert os.path.getmtime(first_run) == mtime  # the finished run was not redone
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['cell'] for r in rows] == ['alpha=0.1,temperature=4.0', 'alpha=0.9,temperature=4.0']
  assert all(r['seeds'] == '2' for r in rows)
  markdown = open(os.path.join(workdir, 'results.md')).read()
  assert markdown.count('(best)') == 1
  best = json.load(open(os.path.join(workdir, 'results.json')))['best_cell']
  assert best == max(rows, key=lambda r: float(r['best_mean']))['cell']
  # The same sweep without interruption ends with bit-identical runs.
  whole = str(tmp_path / 'whole')
  args[args.index(workdir)] = whole
  subprocess.run(args, cwd=ROOT, capture_output=True, check=True, timeout=300)
  from tests.test_train import final_variables
  for cell in ('alpha=0.1,temperature=4.0', 'alpha=0.9,temperature=4.0'):
    for seed in ('seed_0', 'seed_1'):
      a = final_variables(os.path.join(workdir, cell, seed))
      b = final_variables(os.path.join(whole, cell, seed))
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{cell}/{seed}/{key}')


def test_sweep_grid_with_unknown_key_is_a_user_error(tmp_path):
  from tests.conftest import run_main
  proc = run_main('--config', f'{TINY}:ce', '--workdir', str(tmp_path / 'w'), '--config.suite=sweep',
                  '--config.sweep.grid=phases.train.optimizer.learning_rat=0.1,0.2')
  assert proc.returncode == 2
  assert 'did you mean `phases.train.optimizer.learning_rate`' in proc.stderr.strip().splitlines()[-1]


def test_run_writes_history_and_curves(tmp_path):
  from kdjax import train
  from tests.tiny_configs import tiny
  workdir = str(tmp_path / 'run')
  cfg = tiny.get_config('ce')
  cfg.target_top1 = 0.2
  summary = train.train_and_evaluate(cfg, workdir)
  history = report.History(workdir, upto_step=10**9)
  steps, top1 = history.series('eval/top1')
  assert steps == [22, 44, 66, 88] and all(0 <= v <= 1 for v in top1)
  # Time to accuracy: the training clock at each evaluation grows, and the summary reads it at the first
  # evaluation that reached the target.
  clock_steps, clock = history.series('time/train_s')
  assert clock_steps == steps and all(0 < a < b for a, b in zip(clock, clock[1:]))
  first = next(i for i, v in enumerate(top1) if v >= 0.2)
  assert summary['train_s_to_target'] == clock[first] and summary['epochs_to_target'] == steps[first] / 22
  assert history.first_reaching('eval/top1', 1.01) is None
  assert history.series('train/loss')[0]
  for name in ('accuracy.png', 'loss.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000


def test_curves_leave_the_users_pyplot_alone(tmp_path):
  """A notebook's backend and figures are the user's: plotting a run neither switches the backend nor adds or
  closes a pyplot figure."""
  import matplotlib
  from matplotlib import pyplot as plt
  backend = matplotlib.get_backend()
  matplotlib.use('svg')  # stands for a user's backend: any but Agg
  try:
    mine = plt.figure()
    history = report.History(str(tmp_path), upto_step=0)
    for step in (1, 2):
      history.record(step, {'train/loss': 1.0 / step, 'eval/top1': 0.5 * step})
    assert len(history.plot()) == 2
    assert matplotlib.get_backend() == 'svg' and plt.get_fignums() == [mine.number]
  finally:
    plt.close('all')
    matplotlib.use(backend)


class FakeRuns:
  """`run_one` for sweep/repeats tests without training: top-1 = alpha + seed/100, and the files a finished run
  leaves (config.json, summary.json), so that a second sweep can recognise it."""

  def __init__(self, score=lambda alpha, seed: alpha + seed / 100):
    self.calls = []
    self.score = score

  def __call__(self, child, child_dir):
    self.calls.append((child_dir, child.seed))
    best = self.score(child.phases.train.losses.kd.alpha, child.seed)
    if best is None:  # this run diverges, as train_and_evaluate does at a NaN loss
      raise NonFiniteError(f'non-finite loss at step 3 ({child_dir})')
    summary = dict(best_eval_top1=best, eval_top1=best - child.seed / 200)
    os.makedirs(child_dir, exist_ok=True)
    with open(os.path.join(child_dir, 'config.json'), 'w') as f:
      f.write(child.to_json_best_effort())
    with open(os.path.join(child_dir, 'summary.json'), 'w') as f:
      json.dump(summary, f)
    return summary


def _grid_config(seeds, best_cell_seeds=()):
  from tests.tiny_configs import tiny
  cfg = tiny.get_config('kd')
  cfg.suite = 'sweep'
  cfg.teacher.workdir = '/t'
  cfg.repeats.seeds = seeds
  cfg.sweep.grid = 'phases.train.losses.kd.alpha=0.3,0.7,0.5'
  cfg.sweep.best_cell_seeds = best_cell_seeds
  return cfg


def test_sweep_reruns_the_best_cell_on_extra_seeds(tmp_path):
  from kdjax import sweep
  runs = FakeRuns()
  sweep.run_sweep(_grid_config((0,), (1, 2)), str(tmp_path), runs)
  assert [os.path.basename(os.path.dirname(d)) for d, _ in runs.calls] == [
      'alpha=0.3', 'alpha=0.7', 'alpha=0.5', 'alpha=0.7', 'alpha=0.7']
  results = json.load(open(tmp_path / 'results.json'))
  assert results['best_cell'] == 'alpha=0.7'
  assert {r['cell']: r['seeds'] for r in results['cells']} == {'alpha=0.3': 1, 'alpha=0.7': 3, 'alpha=0.5': 1}
  confirmation = results['confirmation']
  assert confirmation['cell'] == 'alpha=0.7' and confirmation['seeds'] == 2
  assert confirmation['best_mean'] == pytest.approx(0.715)      # mean of 0.71 and 0.72: seeds 1 and 2 alone
  assert confirmation['best_std'] == pytest.approx(0.00707107)  # sample std of (0.71, 0.72)
  assert 'on 2 further seed(s) alone it reached best 71.50 ± 0.71 %' in open(tmp_path / 'results.md').read()


def test_extending_a_finished_suite_reuses_its_runs(tmp_path):
  """Adding seeds to a sweep (or a repeats suite) runs only the new ones: a run's recorded config does not
  include the suite's seed list or grid."""
  from kdjax import sweep
  runs = FakeRuns()
  sweep.run_sweep(_grid_config((0,)), str(tmp_path), runs)
  assert len(runs.calls) == 3
  runs.calls.clear()
  sweep.run_sweep(_grid_config((0, 1), (2,)), str(tmp_path), runs)
  assert sorted(seed for _, seed in runs.calls) == [1, 1, 1, 2]


def test_the_best_cell_is_the_grid_choice_even_when_its_confirmation_disappoints(tmp_path):
  from kdjax import sweep
  runs = FakeRuns(score=lambda alpha, seed: alpha if seed == 0 else 0.1)  # the winner collapses on seeds 1, 2
  sweep.run_sweep(_grid_config((0,), (1, 2)), str(tmp_path), runs)
  results = json.load(open(tmp_path / 'results.json'))
  pooled = {r['cell']: r['best_mean'] for r in results['cells']}
  assert pooled['alpha=0.7'] == pytest.approx(0.3) and pooled['alpha=0.7'] < pooled['alpha=0.5']  # (.7+.1+.1)/3
  assert results['best_cell'] == 'alpha=0.7' and results['confirmation']['best_mean'] == pytest.approx(0.1)
  assert len(results['runs']['alpha=0.7']) == 3


def test_a_diverging_cell_is_reported_and_the_sweep_goes_on(tmp_path):
  """alpha=0.7 diverges on seed 1: the other cells and seeds still run, its row says so and has no mean, and the
  best cell is chosen among the cells that did not diverge (it would have won: 0.7 > 0.5)."""
  from kdjax import sweep
  runs = FakeRuns(score=lambda alpha, seed: None if (alpha, seed) == (0.7, 1) else alpha + seed / 100)
  sweep.run_sweep(_grid_config((0, 1)), str(tmp_path), runs)
  assert len(runs.calls) == 6
  results = json.load(open(tmp_path / 'results.json'))
  rows = {r['cell']: r for r in results['cells']}
  assert rows['alpha=0.7']['diverged'] == 1 and rows['alpha=0.7']['best_mean'] is None
  assert rows['alpha=0.5']['diverged'] == 0 and rows['alpha=0.5']['best_mean'] == pytest.approx(0.505)
  assert results['best_cell'] == 'alpha=0.5'
  markdown = open(tmp_path / 'results.md').read()
  assert '| alpha=0.7 | 2 | diverged (1 of 2 seeds) | — | 70.00, diverged |' in markdown
  assert '| alpha=0.5 **(best)** | 2 | 50.50 ± 0.71 | 50.25 ± 0.35 | 50.00, 51.00 |' in markdown
  assert markdown.startswith('# Sweep: cnn2 on digits\n\nGrid: `phases.train.losses.kd.alpha` ∈ {0.3, 0.7, 0.5}; '
                             'seeds 0, 1. Eval top-1 on `test`')
  assert [r['diverged'] for r in csv.DictReader(open(tmp_path / 'results.csv'))] == ['0', '1', '0']

  # The winner diverging on a confirmation seed: still the grid's choice, its row and the note say it diverged.
  unstable = FakeRuns(score=lambda alpha, seed: None if (alpha, seed) == (0.7, 2) else alpha + seed / 100)
  sweep.run_sweep(_grid_config((0,), (1, 2)), str(tmp_path / 'unstable'), unstable)
  results = json.load(open(tmp_path / 'unstable' / 'results.json'))
  assert results['best_cell'] == 'alpha=0.7' and results['confirmation']['diverged'] == 1
  assert results['confirmation']['best_mean'] is None
  markdown = open(tmp_path / 'unstable' / 'results.md').read()
  assert '| alpha=0.7 **(best)** | 3 | diverged (1 of 3 seeds) | — |' in markdown
  assert 'on 2 further seed(s) alone it diverged on 1 of them.' in markdown

  everything = FakeRuns(score=lambda alpha, seed: None)
  assert sweep.run_sweep(_grid_config((0,), (1,)), str(tmp_path / 'all'), everything)['best_cell'] is None
  assert len(everything.calls) == 3  # no winner, so no confirmation runs


def test_axes_with_the_same_last_name_keep_apart_in_cell_names_and_csv_columns(tmp_path):
  from kdjax import sweep
  keys = ['phases.train.losses.kd.temperature', 'phases.train.losses.dkd.temperature', 'seed_offset']
  assert sweep.axis_labels(keys) == {keys[0]: 'kd.temperature', keys[1]: 'dkd.temperature',
                                     keys[2]: 'seed_offset'}
  assert sweep.cell_name({'phases.train.losses.kd.alpha': 0.5}) == 'alpha=0.5'  # unambiguous: the last name alone
  cells = [dict(cell=sweep.cell_name({keys[0]: t, keys[1]: 2 * t}), assignment={keys[0]: t, keys[1]: 2 * t},
                runs=[dict(best_eval_top1=0.5, eval_top1=0.5)]) for t in (1, 4)]
  assert cells[0]['cell'] == 'kd.temperature=1,dkd.temperature=2'
  sweep.write_sweep_results(str(tmp_path), cells)
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert [(r['kd.temperature'], r['dkd.temperature']) for r in rows] == [('1', '2'), ('4', '8')]
