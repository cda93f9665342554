"""A user's own model and loss term, registered in a plugin module outside kdjax: a config trains with them, and a
later process that knows nothing of the plugin (an export, a Predictor) rebuilds the model from what the run
recorded."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from kdjax import plugins
from kdjax.errors import UserError
from tests.conftest import ROOT, run_main

PLUGIN = '''
import jax.numpy as jnp
from kdjax import objective
from kdjax.models import register_model, registry


@register_model('plugin_mlp')
def plugin_mlp(**kwargs):
  return registry.MODELS['mlp2'](**kwargs)


objective.register_term('logit_l2', objective.Term(
    compute=lambda a, s, t, y, ad, epoch: a['scale'] * jnp.mean(jnp.square(s[0].astype(jnp.float32))),
    defaults=dict(scale=1e-3), needs_teacher=False))
'''

CONFIG = '''
from kdjax import config as config_lib
from tests.tiny_configs import tiny


def get_config():
  cfg = tiny.get_config('ce')
  config_lib.use_plugins(cfg, 'kdjax_test_plugin')
  cfg.student = dict(name='plugin_mlp', hidden=16)
  cfg.phases.train.epochs = 1
  cfg.phases.train.losses = {'ce': config_lib.loss_term('ce'),
                             'l2': config_lib.loss_term('logit_l2', weight=0.5, scale=0.01)}
  return cfg
'''


def test_a_plugin_model_and_loss_train_and_export(tmp_path):
  (tmp_path / 'kdjax_test_plugin.py').write_text(PLUGIN)
  (tmp_path / 'plugin_config.py').write_text(CONFIG)
  workdir = str(tmp_path / 'run')
  env = {'PYTHONPATH': os.pathsep.join([str(tmp_path), ROOT])}
  run_main('--config', str(tmp_path / 'plugin_config.py'), '--workdir', workdir, env=env, check=True)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['plugins'] == ['kdjax_test_plugin']
  with open(os.path.join(workdir, 'history.json')) as f:
    assert any('train/l2' in row for row in json.load(f))
  # Fresh processes that never import the plugin themselves: the run's record names it for the export, and the
  # export's model.json for the Predictor (a process of its own, so the export's import cannot help it).
  for script in (f'from kdjax import export; print(export.export_run({workdir!r}))',
                 f'from kdjax import export; p = export.Predictor.load({workdir + "/export"!r}); '
                 "print(p.spec['model'], p.spec['plugins'])"):
    done = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ['plugin_mlp', "['kdjax_test_plugin']"]


def test_a_missing_plugin_is_one_user_error():
  with pytest.raises(UserError, match="plugin module 'no_such_kdjax_plugin' cannot be imported.*PYTHONPATH"):
    plugins.load(['no_such_kdjax_plugin'])


def _readme_block(first_line: str) -> str:
  """The README's ```python block that starts with `first_line`."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    blocks = f.read().split('```python\n')[1:]
  matching = [block.split('```')[0] for block in blocks if block.startswith(first_line)]
  assert len(matching) == 1, f'README has {len(matching)} blocks starting with {first_line!r}'
  return matching[0]


def test_the_readme_extension_example_works(tmp_path):
  """README's plugin and config, as written: the config validates, the model keeps the contract, the loss runs."""
  (tmp_path / 'my_kd.py').write_text(_readme_block('# my_kd.py'))
  (tmp_path / 'my_experiment.py').write_text(_readme_block('# configs/my_experiment.py'))
  script = textwrap.dedent('''
      import jax, jax.numpy as jnp
      from flax import nnx
      import my_experiment
      from kdjax import config as config_lib, objective
      from kdjax.models import create_model
      cfg = my_experiment.get_config()
      config_lib.validate(cfg)
      model = create_model('two_stage', num_classes=10, image_shape=(32, 32, 3), rngs=nnx.Rngs(0), width=32)
      logits, features = model(jnp.zeros((2, 32, 32, 3)), train=True)
      assert logits.shape == (2, 10) and [f.shape for f in features] == [(2, 16, 16, 32), (2, 8, 8, 64)]
      assert model.stage_channels == (32, 64) and cfg.plugins == ('my_kd',)
      fn, _ = objective.build_objective({'l1': cfg.phases.train.losses.l1})
      total, _, _ = fn((jnp.ones((2, 10)), features), (jnp.zeros((2, 10)), features), None, None, 0)
      assert abs(float(total) - 0.5 * 2.0) < 1e-6, total
      print('ok')
  ''')
  done = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), ROOT])}, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-3000:]
