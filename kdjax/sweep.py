"""Sweeps: a config crossed over a grid of values and seeds, run one after another, summarised in one table.

Each (cell, seed) is an ordinary single run in `WORKDIR/<cell>/seed_<s>`; a run whose `summary.json` already
exists for the same config is not run again, and an unfinished one resumes from its checkpoint, so a killed sweep
picks up where it stopped. A run that diverges (a NaN loss, config nonfinite='stop') is a result of its cell, not
the sweep's end: the cell is reported as diverged, is never the best one, and the sweep goes on.
"""
import ast
import itertools
import json
import os

from absl import logging

from kdjax import config as config_lib
from kdjax import report
from kdjax.errors import NonFiniteError, UserError


def parse_grid(spec: str, cfg) -> list[tuple[str, list]]:
  """[(dotted key, [values])] from 'a.b=1,2;c=x,y'; every key must exist in cfg."""
  if not spec.strip():
    raise UserError("suite 'sweep' needs config `sweep.grid`, e.g. "
                    "--config.sweep.grid='phases.train.losses.kd.alpha=0.1,0.5;phases.train.losses.kd.temperature=1,4'")
  axes = []
  for axis in filter(None, (a.strip() for a in spec.split(';'))):
    key, sep, values = axis.partition('=')
    if not sep or not values:
      raise UserError(f'sweep axis {axis!r} must look like key=value1,value2')
    if key.strip() == 'seed' or key.strip().split('.')[0] in ('suite', 'repeats', 'sweep'):
      raise UserError(f'sweep axis {key.strip()!r}: a sweep sets the seeds and the suite itself; give the seeds '
                      "as --config.repeats.seeds='(0,1,2)' and grid axes over the experiment's own keys")
    node = cfg
    for part in key.strip().split('.'):
      if not hasattr(node, 'keys') or part not in node:
        raise config_lib.unknown_key_error(key.strip(), cfg)
      node = node[part]
    axes.append((key.strip(), [_literal(v.strip()) for v in values.split(',')]))
  return axes


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _set(cfg, dotted: str, value) -> None:
  *parents, last = dotted.split('.')
  node = cfg
  for part in parents:
    node = node[part]
  node[last] = value


def axis_labels(keys) -> dict[str, str]:
  """Each dotted key's last parts, as few as keep every key apart (one depth for all keys): `temperature` alone, but
  `kd.temperature` and `dkd.temperature` when both are axes (a cell's name and the CSV's columns need them apart)."""
  keys = list(keys)
  depth = 1
  while True:
    labels = {key: '.'.join(key.split('.')[-depth:]) for key in keys}
    if len(set(labels.values())) == len(keys):
      return labels
    depth += 1


def cell_name(assignment: dict) -> str:
  labels = axis_labels(assignment)
  return ','.join(f'{labels[key]}={value}' for key, value in assignment.items())


def run_sweep(cfg, workdir: str, run_one) -> dict:
  """Run every (cell, seed) with `run_one(child_cfg, child_workdir) -> summary`; write results.{md,json,csv}.

  With `sweep.best_cell_seeds`, the cell that wins on `repeats.seeds` is then rerun on those extra seeds: picking
  the best of many cells on few seeds flatters the winner, and the extra seeds' mean is an estimate free of that
  selection (reported separately as well as pooled into the cell's row).
  """
  cells = []
  for assignment in grid_assignments(cfg):
    cells.append(dict(cell=cell_name(assignment), assignment=assignment,
                      runs=_run_cell(cfg, workdir, assignment, cfg.repeats.seeds, run_one)))
  extra = [s for s in cfg.sweep.best_cell_seeds if s not in cfg.repeats.seeds]
  winner_index = best_cell_index(cells)
  if extra and winner_index is not None:  # no confirmation when every cell diverged
    winner = cells[winner_index]
    logging.info('sweep: best cell %s, rerun on seeds %s', winner['cell'], extra)
    winner['confirmation'] = _run_cell(cfg, workdir, winner['assignment'], extra, run_one)
  grid = ' × '.join(f'`{key}` ∈ {{{", ".join(map(str, values))}}}' for key, values in parse_grid(cfg.sweep.grid, cfg))
  further = f' (the winning cell also on {", ".join(map(str, extra))})' if extra else ''
  intro = [f'# Sweep: {cfg.student.name} on {cfg.data.dataset}', '',
           f'Grid: {grid}; seeds {", ".join(map(str, cfg.repeats.seeds))}{further}. Eval top-1 on '
           f'`{cfg.data.eval_split}`: best over a run\'s evaluations and last (at its end); each cell: mean ± sample '
           'std (ddof 1) over its seeds, and the best of each seed in that order.', '']
  return write_sweep_results(workdir, cells, intro)


def grid_assignments(cfg) -> list[dict]:
  """Every cell of `sweep.grid`, as {dotted key: value}, in the grid's order."""
  axes = parse_grid(cfg.sweep.grid, cfg)
  return [dict(zip((k for k, _ in axes), values)) for values in itertools.product(*(v for _, v in axes))]


def cell_config(cfg, assignment: dict, seed: int):
  """The config of one run of a cell: a single run of `cfg` at `seed`, with the cell's values set."""
  child = config_lib.single_run(cfg, seed=int(seed))
  with child.unlocked():
    for key, value in assignment.items():
      _set(child, key, value)
  return child


def _run_cell(cfg, workdir: str, assignment: dict, seeds, run_one) -> list[dict]:
  summaries = []
  for seed in seeds:
    child = cell_config(cfg, assignment, seed)
    summaries.append(run_or_reuse(child, os.path.join(workdir, cell_name(assignment), f'seed_{seed}'), run_one))
  return summaries


def run_or_reuse(child, child_dir: str, run_one) -> dict:
  """One run of a suite: the summary of an identical finished run, else `run_one`'s; a run that diverges (a NaN loss
  under nonfinite='stop') is a result of the suite, recorded as `diverged`, not the suite's end."""
  try:
    return finished_summary(child, child_dir) or run_one(child, child_dir)
  except NonFiniteError as error:
    logging.warning('%s diverged: %s', child_dir, error)
    return dict(workdir=child_dir, diverged=str(error), eval_top1=None, best_eval_top1=None)


def best_cell_index(cells: list[dict]) -> int | None:
  """The cell with the highest mean best eval top-1 over its grid runs (the first one on a tie): the choice made
  on the grid's seeds, which confirmation runs then test rather than change. Cells with a diverged run are out;
  None when every cell has one."""
  means = {i: report.mean_std([r['best_eval_top1'] for r in cell['runs']])[0] for i, cell in enumerate(cells)
           if not _diverged(cell['runs'])}
  return max(means, key=means.get) if means else None


def _diverged(runs: list[dict]) -> int:
  return sum('diverged' in r for r in runs)


def finished_summary(child, child_dir):
  """The summary of a run that already finished with this exact config (skipped on a re-run)."""
  try:
    with open(os.path.join(child_dir, 'summary.json')) as f:
      summary = json.load(f)
    with open(os.path.join(child_dir, 'config.json')) as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  if config_lib.differing_keys(json.loads(child.to_json_best_effort()), recorded):
    return None
  logging.info('sweep: %s already finished, not rerun', child_dir)
  return summary


def write_sweep_results(workdir: str, cells: list[dict], intro=()) -> dict:
  """results.{md,json,csv} of the sweep's cells; `intro`: the markdown lines above the table (title, grid)."""
  rows = []
  lines = [*intro, '| cell | seeds | best eval top-1 (%) | last eval top-1 (%) | best per seed (%) |',
           '|---|---|---|---|---|']
  winner = best_cell_index(cells)
  for i, cell in enumerate(cells):
    runs = cell['runs'] + cell.get('confirmation', [])  # a row pools every seed the cell ran on
    diverged = _diverged(runs)
    # A cell with a diverged seed has no mean: averaging its other seeds would hide the recipe's instability.
    best = (None, None) if diverged else report.mean_std([r['best_eval_top1'] for r in runs])
    last = (None, None) if diverged else report.mean_std([r['eval_top1'] for r in runs])
    rows.append(dict(cell=cell['cell'], seeds=len(runs), diverged=diverged, best_mean=best[0], best_std=best[1],
                     last_mean=last[0], last_std=last[1],
                     **{axis_labels(cell['assignment'])[k]: v for k, v in cell['assignment'].items()}))
    mark = ' **(best)**' if i == winner else ''
    per_seed = ', '.join('diverged' if 'diverged' in r else report.pct(r['best_eval_top1']) for r in runs)
    if diverged:  # the winner too, when one of its confirmation seeds diverged
      lines.append(f'| {cell["cell"]}{mark} | {len(runs)} | diverged ({diverged} of {len(runs)} seeds) | — | '
                   f'{per_seed} |')
    else:
      lines.append(f'| {cell["cell"]}{mark} | {len(runs)} | {report.pct(best[0])} ± {report.pct(best[1])} | '
                   f'{report.pct(last[0])} ± {report.pct(last[1])} | {per_seed} |')
  results = dict(cells=rows, best_cell=None if winner is None else rows[winner]['cell'],
                 runs={c['cell']: c['runs'] + c.get('confirmation', []) for c in cells})
  confirmed = next((c for c in cells if c.get('confirmation')), None)
  if confirmed:
    extra, diverged = confirmed['confirmation'], _diverged(confirmed['confirmation'])
    results['confirmation'] = dict(cell=confirmed['cell'], seeds=len(extra), diverged=diverged, best_mean=None,
                                   best_std=None, last_mean=None, last_std=None)
    intro = (f'{confirmed["cell"]} won on the grid\'s seeds (its row pools those with the further seeds, so another'
             f' row may show a higher mean); on {len(extra)} further seed(s) alone it')
    if diverged:
      lines += ['', f'{intro} diverged on {diverged} of them.']
    else:
      best = report.mean_std([r['best_eval_top1'] for r in extra])
      last = report.mean_std([r['eval_top1'] for r in extra])
      results['confirmation'].update(best_mean=best[0], best_std=best[1], last_mean=last[0], last_std=last[1])
      lines += ['', f'{intro} reached best {report.pct(best[0])} ± {report.pct(best[1])} %, last '
                f'{report.pct(last[0])} ± {report.pct(last[1])} % (free of the selection among cells).']
  markdown = '\n'.join(lines) + '\n'
  report.save_results(workdir, markdown, results, csv_rows=rows)
  print(markdown, flush=True)
  if winner is None:
    return dict(cells=len(rows), best_cell=None, best_mean=None)
  return dict(cells=len(rows), best_cell=rows[winner]['cell'], best_mean=rows[winner]['best_mean'])
