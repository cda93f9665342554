"""CIFAR-10 Hinton-KD grid: ResNet-18 teacher -> 2-layer CNN, alpha x T, over seeds.

Command (after configs/cifar10_teacher.py finished in workdirs/cifar10_teacher):
`python main.py --config configs/cifar10_kd_grid.py --workdir workdirs/cifar10_kd_grid`
Grid: alpha in {0.1, 0.25, 0.5, 0.75, 0.9} x T in {1, 2.5, 5, 7.5, 10, 20, 30, 40, 50} on seed 0, then the best
cell rerun on seeds 1 and 2 (`sweep.best_cell_seeds`; their mean alone is reported too, free of the selection);
`--config.repeats.seeds='(0,1,2)'` runs every cell on three. Writes results.md/json/csv with the best cell marked.
Killing it and running the same command again skips the finished runs. Not yet run on a GPU.
"""
from kdjax.config import config_args
from configs import cifar10_kd

ALPHAS = (0.1, 0.25, 0.5, 0.75, 0.9)
TEMPERATURES = (1, 2.5, 5, 7.5, 10, 20, 30, 40, 50)


def get_config(arg=None):
  config_args(arg, 'smoke')
  cfg = cifar10_kd.get_config(arg)
  cfg.suite = 'sweep'
  cfg.repeats.seeds = (0,)
  cfg.sweep.best_cell_seeds = (1, 2)
  cfg.sweep.grid = (f'phases.train.losses.kd.alpha={",".join(map(str, ALPHAS))};'
                    f'phases.train.losses.kd.temperature={",".join(map(str, TEMPERATURES))}')
  return cfg
