"""What one command runs (`config.suite`): a single run, a teacher/CE/KD comparison, repeats over seeds, a sweep.

A suite is a function `(config, workdir) -> summary dict` that runs one or more single runs in sub-workdirs; each
of them resumes independently, so re-running a killed suite redoes nothing that finished.
"""
import copy
import os

import jax
import ml_collections
from absl import logging

from kdjax import config as config_lib
from kdjax import report
from kdjax import sweep
from kdjax import train


def run_single(cfg, workdir):
  return train.train_and_evaluate(cfg, workdir)


def kd_comparison_configs(cfg, workdir) -> dict[str, ml_collections.ConfigDict]:
  """Teacher (trained with CE), student with CE only, student with the config's KD losses, in that order."""
  ce_only = ml_collections.ConfigDict({'ce': config_lib.loss_term('ce')})
  first = cfg.phases[cfg.schedule[0]]
  teacher_phase = config_lib.phase(cfg.teacher.epochs, ce_only, copy.deepcopy(first.optimizer))
  teacher_cfg = config_lib.single_run(cfg, schedule=('train',),
                                      phases=ml_collections.ConfigDict({'train': teacher_phase}))
  with teacher_cfg.unlocked():
    teacher_cfg.student = ml_collections.ConfigDict({'name': cfg.teacher.name})
    teacher_cfg.teacher.workdir = ''
  ce_cfg = config_lib.single_run(cfg)
  for name in ce_cfg.schedule:
    ce_cfg.phases[name].losses = copy.deepcopy(ce_only)
  ce_cfg.teacher.workdir = ''
  kd_cfg = config_lib.single_run(cfg)
  kd_cfg.teacher.workdir = os.path.join(workdir, 'teacher')
  return {'teacher': teacher_cfg, 'student_ce': ce_cfg, 'student_kd': kd_cfg}


def run_kd_comparison(cfg, workdir):
  summaries = {}
  for name, child in kd_comparison_configs(cfg, workdir).items():
    logging.info('kd_comparison: %s', name)
    summaries[name] = train.train_and_evaluate(child, os.path.join(workdir, name))
  rows = ['| run | model | eval top-1 (%) | best (%) | wall (s) |', '|---|---|---|---|---|']
  rows += [f'| {n} | {s["student"]} | {report.pct(s["eval_top1"])} | {report.pct(s["best_eval_top1"])} | '
           f'{s["wall_s"]} |' for n, s in summaries.items()]
  table = '\n'.join(rows)
  print(table, flush=True)
  report.save_results(workdir, table + '\n', summaries)
  return {name: {k: s[k] for k in ('eval_top1', 'best_eval_top1', 'wall_s')} for name, s in summaries.items()}


def run_repeats(cfg, workdir):
  rows = []
  for seed in cfg.repeats.seeds:
    child = config_lib.single_run(cfg, seed=int(seed))
    child_dir = os.path.join(workdir, f'seed_{seed}')
    summary = sweep.run_or_reuse(child, child_dir, train.train_and_evaluate)
    rows.append(dict(name=f'seed_{seed}', **summary))
  markdown, results = report.write_results(workdir, f'{cfg.student.name} on {cfg.data.dataset}', rows)
  print(markdown, flush=True)
  best = results['best_eval_top1']
  return dict(runs=len(rows), best_eval_top1_mean=best['mean'], best_eval_top1_std=best['std'])


def run_sweep(cfg, workdir):
  return sweep.run_sweep(cfg, workdir, train.train_and_evaluate)


SUITES = {'single': run_single, 'kd_comparison': run_kd_comparison, 'repeats': run_repeats, 'sweep': run_sweep}


def run(cfg, workdir):
  """Validate the whole config first (the suite's own keys too: its grid, every cell, the seeds), so a bad value
  stops the command before any run trains, then run the suite."""
  config_lib.validate(cfg, jax.device_count())
  return SUITES[cfg.suite](cfg, workdir)
