"""Results tables over runs: mean ± sample std (ddof=1) of best and last accuracy, as Markdown and JSON."""
import json
import math
import os


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0.0 for a single value), as papers report `mean ± std`."""
  values = [float(v) for v in values]
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pct(value: float) -> str:
  return f'{100 * value:.2f}'


def write_results(workdir: str, title: str, rows: list[dict]) -> str:
  """`results.md` and `results.json` in workdir: one line per run, then mean ± std; returns the Markdown."""
  best_mean, best_std = mean_std([r['best_eval_top1'] for r in rows])
  last_mean, last_std = mean_std([r['eval_top1'] for r in rows])
  lines = [f'# {title}', '', '| run | best eval top-1 (%) | last eval top-1 (%) |', '|---|---|---|']
  lines += [f'| {r["name"]} | {pct(r["best_eval_top1"])} | {pct(r["eval_top1"])} |' for r in rows]
  lines += [f'| **mean ± std (n={len(rows)})** | **{pct(best_mean)} ± {pct(best_std)}** | '
            f'**{pct(last_mean)} ± {pct(last_std)}** |', '']
  markdown = '\n'.join(lines)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(dict(title=title, runs=rows, best_eval_top1=dict(mean=best_mean, std=best_std),
                   last_eval_top1=dict(mean=last_mean, std=last_std)), f, indent=2)
  return markdown
