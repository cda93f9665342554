"""Plugin modules: where a user's own models (`kdjax.models.register_model`) and loss terms
(`kdjax.objective.register_term`) are registered.

A config names them in `plugins` (`kdjax.config.use_plugins` imports them while the config is built, so its loss
terms can name the new kinds). The run records them in config.json and its export in model.json, so whatever
rebuilds its model later (a student that names the run as its teacher, `--mode=eval/predict/export`,
`Predictor.load`) imports them first instead of failing on an unknown name.
"""
import importlib

from kdjax.errors import UserError


def load(modules) -> None:
  """Import each module (once; Python caches them)."""
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as error:
      raise UserError(f'plugin module {name!r} cannot be imported ({error}); install it or put its folder on '
                      'PYTHONPATH where this command runs') from None
