"""kdjax command line: `python main.py [--config configs/X.py[:arg]] [--config.key=value ...] [--workdir DIR]`.

With no flags it runs the embedded default (configs/default.py): a teacher, a CE student and a KD student on
scikit-learn's bundled digits, offline, on a CPU, in under a minute.
"""
import json
import os
import re
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kdjax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, event files and results go '
                               '(default: kdjax.config.default_workdir: workdirs/<config name>[_<args, sorted>]).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'check', 'eval', 'match', 'predict', 'export'],
                          'train (or resume) the config; check: validate it and exit (no data read, nothing '
                          'trained); eval: accuracy of the run\'s best checkpoint on data.eval_split; match: how '
                          'close its feature maps are to its teacher\'s there (kdjax.feature_match); predict: '
                          'classes of --images; export: write WORKDIR/export.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files for --mode=predict.')


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _explain_flag_error(argv, error) -> str:
  """Turn a config-flag parsing failure into one line naming the bad key and the closest valid one."""
  from kdjax import config as config_lib
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg is None and '--config' in argv[:-1]:
    config_arg = argv[argv.index('--config') + 1]
  path = config_arg or os.path.join(HERE, 'configs', 'default.py')
  file, _, arg = path.partition(':')
  if not os.path.exists(file):
    return f'config file {file} not found; pass --config configs/<name>.py (see the configs/ folder)'
  try:
    base = runpy.run_path(file)['get_config'](*([arg] if arg else []))
  except UserError as config_error:  # an argument the config file does not take
    return str(config_error)
  except Exception as config_error:  # the config file itself is broken
    return f'config file {path} failed to load: {config_error!r}'
  for arg_text in argv[1:]:
    match = re.match(r'--config\.([^=]+)(=.*)?$', arg_text)
    if not match:
      continue
    node = base
    for part in match.group(1).split('.'):
      if not hasattr(node, 'keys') or part not in node:
        return str(config_lib.unknown_key_error(match.group(1), base))
      node = node[part]
  return f'{error}'.replace('\n', ' ') + ' (fix the value of that --config flag)'


# What ml_collections raises for a bad --config flag, and config_args for a bad `file.py:arg`.
_FLAG_ERRORS = (AttributeError, KeyError, ValueError, TypeError, UserError)


def _define_config_flag():
  """The --config flag. Its default file is loaded here, at import, and the --config.key=value overrides of the
  command line are applied to it at once, so a misspelled key in a command without --config fails here, not in
  `parse_flags`: give it the same one-line message."""
  try:
    return config_flags.DEFINE_config_file('config', os.path.join(HERE, 'configs', 'default.py'),
                                           'Experiment config file (ml_collections), optionally `file.py:arg`.',
                                           lock_config=True)
  except _FLAG_ERRORS as error:
    _fail(_explain_flag_error(sys.argv, error))


_CONFIG = _define_config_flag()


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *_FLAG_ERRORS) as error:
    _fail(_explain_flag_error(argv, error))


def _quiet_orbax(record) -> bool:
  """Orbax logs every save and restore at INFO; keep its warnings, drop the chatter from the console."""
  return record.levelno >= 30 or '/orbax/' not in record.pathname  # 30: Python's WARNING


def main(argv):
  del argv
  logging.get_absl_logger().addFilter(_quiet_orbax)
  from kdjax import mesh
  try:
    mesh.maybe_initialize_distributed()
  except UserError as error:
    _fail(str(error))
  try:
    cfg = _CONFIG.value
    cfg.keys()  # the config loads lazily: make a missing or broken file fail here
  except Exception as error:  # the config file is missing or raised while loading
    _fail(_explain_flag_error(sys.argv, error))
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  from kdjax import config as config_lib
  workdir = _WORKDIR.value or config_lib.default_workdir(*config_path.split(':', 1))
  logging.info('config %s -> workdir %s', config_path, workdir)
  from kdjax import compile_cache, report, writers
  compile_cache.enable(cfg.data.cache_dir or None)
  try:
    writers.requested_backend()  # a bad $KDJAX_METRIC_WRITER stops here, not after the data is read
    result = MODES[_MODE.value](cfg, workdir)
  except UserError as error:
    _fail(str(error))
  except KeyboardInterrupt:
    resume = f'; the same command resumes from the latest checkpoint in {workdir}' if _MODE.value == 'train' else ''
    print(f'interrupted{resume}', file=sys.stderr, flush=True)
    sys.exit(130)
  print(json.dumps(report.strict({_MODE.value: result}), default=str, allow_nan=False), flush=True)


def _train(cfg, workdir):
  from kdjax import suites
  return suites.run(cfg, workdir)


def _check(cfg, workdir):
  """Validate the config as training would, before any data is read: a typo costs seconds, not a GPU slot."""
  import jax
  from kdjax import config as config_lib
  config_lib.validate(cfg, jax.device_count())
  checked = dict(workdir=workdir, suite=cfg.suite, student=cfg.student.name, schedule=list(cfg.schedule),
                 dataset=cfg.data.dataset)
  # Valid, but a run would stop at its start: say so now (a teacher trained later in the queue is fine).
  external = cfg.suite != 'kd_comparison' and config_lib.uses_teacher(cfg)
  missing = [w for w in config_lib.teacher_workdirs(cfg) if external and not os.path.isdir(w)]
  if missing:
    logging.warning('teacher.workdir %s does not exist yet: train the teacher before running this config',
                    ', '.join(missing))
    checked['teacher_not_found'] = missing
  return checked


# Where a machine keeps data and caches: taken from a run's record only where that folder exists here (the record
# may come from another machine).
_MACHINE_DATA_KEYS = ('cache_dir', 'data_dir')


def _run_data(cfg, workdir):
  """The data keys of the run in `workdir` as it recorded them, with those this command line sets on top: a run
  is evaluated on its own dataset whatever --config the command names (or omits)."""
  from kdjax import export
  recorded = export.read_json(os.path.join(workdir, 'config.json')).get('data', {})
  given = {key.split('.', 1)[1] for key in config_flags.get_override_values(flags.FLAGS['config'])
           if key.startswith('data.')}
  data = cfg.data.to_dict()
  data.update({key: value for key, value in recorded.items() if key in data and key not in given and (
      key not in _MACHINE_DATA_KEYS or (value and os.path.isdir(os.path.expanduser(value))))})
  return data


def _eval_split(cfg, workdir, spec):
  """The run's eval split (see `_run_data`); a split of other classes or channels than the run's is refused."""
  from kdjax import run_data
  from kdjax.data import load_split
  data = _run_data(cfg, workdir)
  split = load_split(os.path.expanduser(data['dataset']), data['eval_split'], image_size=data['image_size'] or None,
                     cache_dir=data['cache_dir'] or None, data_dir=data['data_dir'] or None,
                     on_corrupt=data['on_corrupt'])
  split = run_data.with_channels(split, spec['image_shape'][-1])  # a gray split of an RGB run, as in training
  if list(split.class_names) != list(spec['class_names']) or split.images.shape[-1] != spec['image_shape'][-1]:
    raise UserError(f'{data["dataset"]} ({len(split.class_names)} classes, {split.images.shape[-1]} channel(s)) is '
                    f'not the data the run in {workdir} learnt ({len(spec["class_names"])} classes, '
                    f'{spec["image_shape"][-1]} channel(s)); pass --config.data.dataset=<its dataset>')
  return data['eval_split'], split


def _eval(cfg, workdir):
  from kdjax import export
  predictor = export.Predictor.load(workdir)
  split_name, split = _eval_split(cfg, workdir, predictor.spec)
  result = export.evaluate_split(predictor, split.images, split.labels)
  return dict(workdir=workdir, split=split_name, **result)


def _match(cfg, workdir, batch_size=500):
  """The run's student against the config's teacher on data.eval_split (see kdjax.feature_match)."""
  import jax.numpy as jnp
  from kdjax import config as config_lib
  from kdjax import export, feature_match, teachers
  if not config_lib.teacher_workdirs(cfg):
    raise UserError('--mode=match compares the run with a teacher; set --config.teacher.workdir=DIR of the '
                    'teacher it was distilled from')
  student = export.Predictor.load(workdir)
  spec = student.spec
  # Both in the run's compute dtype, as training ran them: a float32 teacher against a bf16 student would count
  # precision noise as distance.
  teacher = teachers.restore_teacher(cfg, num_classes=len(spec['class_names']),
                                     image_shape=tuple(spec['image_shape']),
                                     dtype=jnp.dtype(spec.get('compute_dtype', 'float32')),
                                     mean=spec['mean'], std=spec['std'])
  split_name, split = _eval_split(cfg, workdir, spec)
  batches = ((student.normalize(jnp.asarray(split.images[i:i + batch_size])), split.labels[i:i + batch_size])
             for i in range(0, len(split.labels), batch_size))
  return dict(workdir=workdir, teacher=cfg.teacher.workdir, split=split_name,
              **feature_match.compare(student.model, teacher, batches))


def _predict(cfg, workdir):
  from kdjax import export
  if not _IMAGES.value:
    raise UserError('--mode=predict needs --images=a.jpg,b.png')
  return export.Predictor.load(workdir).predict_files(_IMAGES.value)


def _export(cfg, workdir):
  from kdjax import export
  return dict(export=export.export_run(workdir))


MODES = {'train': _train, 'check': _check, 'eval': _eval, 'match': _match, 'predict': _predict,
         'export': _export}


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
