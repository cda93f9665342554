"""Results tables over runs: mean ± sample std (ddof=1) of best and last accuracy, as Markdown and JSON."""
import csv
import json
import math
import os

import jax
import numpy as np


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0.0 for a single value), as papers report `mean ± std`."""
  values = [float(v) for v in values]
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pct(value: float) -> str:
  return f'{100 * value:.2f}'


def write_results(workdir: str, title: str, rows: list[dict]) -> tuple[str, dict]:
  """`results.md` and `results.json` in workdir: one line per run, then mean ± std; returns both contents.

  Columns: best and last eval top-1, and the held-out top-1 (subset mode's accuracy on the rest of the training
  split) when every run has one. A run that diverged (`diverged` in its row) has no figures, and the recipe then
  has no mean: averaging the other seeds would hide its instability.
  """
  columns = [('best_eval_top1', 'best eval top-1 (%)', 'best_eval_top1'),
             ('eval_top1', 'last eval top-1 (%)', 'last_eval_top1')]  # (summary key, header, results.json key)
  if rows and all('heldout_top1' in r for r in rows):
    columns.append(('heldout_top1', 'held-out top-1 (%)', 'heldout_top1'))
  diverged = sum('diverged' in r for r in rows)
  stats = {key: (None, None) if diverged else mean_std([r[key] for r in rows]) for key, *_ in columns}
  lines = [f'# {title}', '', '| run | ' + ' | '.join(h for _, h, _ in columns) + ' |',
           '|---' * (len(columns) + 1) + '|']
  lines += [f'| {r["name"]} | ' + ' | '.join('diverged' if 'diverged' in r else pct(r[key]) for key, *_ in columns)
            + ' |' for r in rows]

  def summary(key):
    if diverged:
      return f'**diverged ({diverged} of {len(rows)} seeds)**'
    return f'**{pct(stats[key][0])} ± {pct(stats[key][1])}**'
  lines += [f'| **mean ± std (n={len(rows)})** | ' + ' | '.join(summary(key) for key, *_ in columns) + ' |', '']
  markdown = '\n'.join(lines)
  data = dict(title=title, runs=rows, **{name: dict(mean=stats[key][0], std=stats[key][1])
                                          for key, _, name in columns})
  save_results(workdir, markdown, data)
  return markdown, data


def strict(data):
  """`data` with every non-finite float (a diverged run's NaN loss) as None: JSON has no NaN, and Python's bare
  `NaN` in a file breaks every other reader (jq, JavaScript, pandas' strict mode)."""
  if isinstance(data, dict):
    return {key: strict(value) for key, value in data.items()}
  if isinstance(data, (list, tuple)):
    return [strict(value) for value in data]
  if isinstance(data, (float, np.floating)):
    return float(data) if math.isfinite(data) else None
  return data


def write_json(path: str, data, **dump_args) -> None:
  """Write strict JSON (see `strict`) atomically (a temporary file, then a rename): a run killed mid-write, or
  another process reading at that moment, sees the old file or the new one, never half of one -- a sweep resumes
  from these files."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(strict(data), f, allow_nan=False, **dump_args)
  os.replace(tmp, path)


def save_results(workdir: str, markdown: str, data: dict, csv_rows: list[dict] | None = None) -> None:
  """results.md, results.json (and results.csv) in `workdir`, written by process 0 only in a multi-process run."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown)
  write_json(os.path.join(workdir, 'results.json'), data, indent=2, default=str)
  if csv_rows:
    with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
      writer.writeheader()
      writer.writerows(csv_rows)


# The loss curves are two different quantities: the training objective (every weighted term, KD's included) and
# the plain cross-entropy on the evaluation labels.
PLOT_LABELS = {'train/loss': 'train objective (weighted terms)', 'eval/loss': 'eval cross-entropy'}


class History:
  """Every logged scalar of a run, by step, in `history.json`; cut back to the resumed step on restart."""

  def __init__(self, workdir: str, upto_step: int):
    self.path = os.path.join(workdir, 'history.json')
    self.rows = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        # A diverged step's NaN was written as null (`strict`); it is NaN again here, for plots and comparisons.
        self.rows = [{k: math.nan if v is None else v for k, v in row.items()}
                     for row in json.load(f) if row['step'] <= upto_step]

  def record(self, step: int, scalars: dict) -> None:
    self.rows.append(dict(step=int(step), **{k: float(v) for k, v in scalars.items()}))

  def save(self) -> None:
    if jax.process_index() != 0:  # one writer: every process holds the same rows
      return
    write_json(self.path, self.rows)

  def series(self, key: str) -> tuple[list[int], list[float]]:
    points = [(row['step'], row[key]) for row in self.rows if key in row]
    return [p[0] for p in points], [p[1] for p in points]

  def first_reaching(self, key: str, target: float) -> dict | None:
    """All scalars logged at the first step where `key` >= target (e.g. 'time/train_s' at the first eval top-1
    >= 0.94), or None if it never got there."""
    step = next((row['step'] for row in self.rows if row.get(key, -float('inf')) >= target), None)
    if step is None:
      return None
    merged = {}
    for row in self.rows:
      if row['step'] == step:
        merged.update(row)
    return merged

  def plot(self) -> list[str]:
    """accuracy.png (train/eval top-1, top-5, teacher agreement) and loss.png in the workdir; [] without matplotlib.

    Drawn on `matplotlib.figure.Figure`s, not through pyplot: pyplot's global backend and figure list belong to the
    user (a notebook's inline backend stays as it was), and a figure nobody registered needs no closing.
    """
    try:
      from matplotlib.figure import Figure
    except ImportError:
      return []
    written = []
    for name, keys in (('accuracy', ('top1', 'top5', 'agreement')), ('loss', ('loss',))):
      fig = Figure(figsize=(7, 4))
      ax = fig.add_subplot()
      for split in ('train', 'eval'):
        for key in keys:
          steps, values = self.series(f'{split}/{key}')
          if not steps:
            continue
          label = PLOT_LABELS.get(f'{split}/{key}', f'{split} {key}')
          if not any(math.isfinite(v) for v in values):
            label += ' (no finite value)'  # a diverged run: nothing to draw, but the legend says why
          # Eval points, and a series of one point, get markers: a line of one point draws nothing.
          ax.plot(steps, values, label=label, marker='.' if split == 'eval' or len(steps) == 1 else None)
      ax.set_xlabel('step')
      ax.set_ylabel(name)
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend()
      path = os.path.join(os.path.dirname(self.path), f'{name}.png')
      fig.savefig(path, dpi=100, bbox_inches='tight')
      written.append(path)
    return written
