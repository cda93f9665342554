"""Export, eval and predict: a trained model leaves the training code behind and gives the same answers."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from kdjax import export
from kdjax.data import load_split
from tests.conftest import TINY, run_main


def test_export_eval_predict_round_trip(tmp_path, teacher_workdir):
  digits = load_split('digits', 'test')
  from_run = export.Predictor.load(teacher_workdir)
  reference = from_run.predict_arrays(digits.images[:50])
  out = export.export_run(teacher_workdir, str(tmp_path / 'export'))
  assert sorted(os.listdir(out)) == ['model.json', 'params.msgpack']
  exported = export.Predictor.load(out)
  np.testing.assert_allclose(exported.predict_arrays(digits.images[:50]), reference, rtol=1e-6, atol=1e-7)
  accuracy = export.evaluate_split(exported, digits.images, digits.labels)
  summary = json.load(open(os.path.join(teacher_workdir, 'summary.json')))
  assert abs(accuracy['top1'] - summary['best_eval_top1']) < 1e-6  # the best checkpoint, evaluated again
  # Its top-5 too, as training ranked it (on the logits; a saturated softmax ties where the logits do not).
  evals = [row for row in json.load(open(os.path.join(teacher_workdir, 'history.json'))) if 'eval/top5' in row]
  best_row = next(row for row in evals if row['eval/top1'] == max(r['eval/top1'] for r in evals))
  assert abs(accuracy['top5'] - best_row['eval/top5']) < 1e-6

  proc = run_main('--config', f'{TINY}:teacher', '--workdir', teacher_workdir, '--mode=eval', check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])['eval']
  assert abs(result['top1'] - accuracy['top1']) < 1e-6 and result['examples'] == len(digits.labels)

  files = []
  for i in range(3):
    path = tmp_path / f'digit{i}.png'
    Image.fromarray(digits.images[i][..., 0]).save(path)
    files.append(str(path))
  proc = run_main('--config', f'{TINY}:teacher', '--workdir', out, '--mode=predict', f'--images={",".join(files)}',
                  check=True)
  predictions = json.loads(proc.stdout.strip().splitlines()[-1])['predict']
  assert [p['label'] for p in predictions] == [digits.class_names[int(k)] for k in reference[:3].argmax(-1)]
  assert all(abs(sum(p['probabilities'].values()) - 1) < 1e-4 for p in predictions)


def test_predict_reads_files_as_training_decoded_them(tmp_path, teacher_workdir):
  """A colour file for a grayscale model becomes luma; a 16-bit file is scaled to 8 bits, not clipped to white."""
  predictor = export.Predictor.load(teacher_workdir)
  height, width, channels = predictor.spec['image_shape']
  gray8 = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
  Image.fromarray(gray8).save(tmp_path / 'gray8.png')
  Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / 'gray16.png')  # 8 bits -> 16: x * 257
  Image.fromarray(np.stack([gray8] * 3, axis=-1)).save(tmp_path / 'rgb.png')
  assert channels == 1
  reference = predictor.read_image(str(tmp_path / 'gray8.png'))
  assert reference.shape == (height, width, 1)
  np.testing.assert_array_equal(reference[..., 0], gray8)
  np.testing.assert_array_equal(predictor.read_image(str(tmp_path / 'gray16.png')), reference)
  np.testing.assert_array_equal(predictor.read_image(str(tmp_path / 'rgb.png')), reference)


def test_predictor_computes_in_the_runs_dtype(tmp_path):
  """A bf16 run is evaluated and predicted in bf16, as its training evaluations were."""
  import jax.numpy as jnp
  from kdjax import train
  from tests.tiny_configs import tiny
  cfg = tiny.get_config('ce')
  cfg.compute_dtype = 'bfloat16'
  cfg.phases.train.epochs = 1.0
  summary = train.train_and_evaluate(cfg, str(tmp_path / 'bf16'))
  predictor = export.Predictor.load(str(tmp_path / 'bf16'))
  assert predictor.spec['compute_dtype'] == 'bfloat16'
  _, features = predictor.model(jnp.zeros((2,) + tuple(predictor.spec['image_shape'])), train=False)
  assert features[-1].dtype == jnp.bfloat16
  # Within two of the 359 examples: bf16 rounds differently at another batch size (500 here, 64 in training).
  digits = load_split('digits', 'test')
  assert export.evaluate_split(predictor, digits.images, digits.labels)['top1'] == pytest.approx(
      summary['best_eval_top1'], abs=2 / len(digits.labels) + 1e-6)


def _damage(folder, change):
  if change == 'truncated':
    with open(os.path.join(folder, 'params.msgpack'), 'r+b') as f:
      f.truncate(os.path.getsize(f.name) // 2)
  elif change == 'no_model_json':
    os.remove(os.path.join(folder, 'model.json'))
  else:  # model.json of another run: 5 classes over the 10-class parameters
    spec = json.load(open(os.path.join(folder, 'model.json')))
    spec['class_names'] = spec['class_names'][:5]
    json.dump(spec, open(os.path.join(folder, 'model.json'), 'w'))


@pytest.mark.parametrize('change, message', [('truncated', 'cannot read the export'),
                                             ('no_model_json', 'cannot read the export'),
                                             ('other_classes', r'does not fit the cnn3 with 5 classes.*head')])
def test_a_damaged_export_is_one_clear_error(tmp_path, teacher_workdir, change, message):
  from kdjax.errors import UserError
  out = export.export_run(teacher_workdir, str(tmp_path / 'export'))
  _damage(out, change)
  with pytest.raises(UserError, match=message) as error:
    export.Predictor.load(out)
  assert '--mode=export' in str(error.value)


@pytest.mark.long
def test_eval_reads_the_runs_own_data_and_refuses_other_classes(tmp_path, teacher_workdir):
  """--mode=eval uses the data the run recorded, whatever config the command names, with the command line's own
  data keys on top; data of other classes is one clear error."""
  import shutil
  run = tmp_path / 'run'
  shutil.copytree(teacher_workdir, run)
  record = json.load(open(run / 'config.json'))
  record['data']['eval_split'] = 'test[:25%]'  # as if the run had been trained with this eval split
  record['data']['cache_dir'] = '/proc/another_machines_cache'  # machine-local: never taken from the record
  json.dump(record, open(run / 'config.json', 'w'))
  quarter = len(load_split('digits', 'test[:25%]').labels)
  proc = run_main('--workdir', str(run), '--mode=eval', check=True)  # no --config: the default's eval_split is test
  result = json.loads(proc.stdout.strip().splitlines()[-1])['eval']
  assert result['split'] == 'test[:25%]' and result['examples'] == quarter
  for override in (['--config.data.eval_split=test[:50%]'], ['--config.data.eval_split', 'test[:50%]']):
    proc = run_main('--workdir', str(run), '--mode=eval', *override, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])['eval']['split'] == 'test[:50%]'

  other = tmp_path / 'other'
  for split in ('train', 'test'):
    for name in ('a', 'b', 'c'):
      (other / split / name).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / split / name / '0.png')
  proc = run_main('--workdir', str(run), '--mode=eval', f'--config.data.dataset={other}',
                  f'--config.data.cache_dir={tmp_path / "cache"}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'is not the data the run in' in proc.stderr.strip().splitlines()[-1]


def test_eval_takes_the_recorded_cache_dir_only_where_it_exists_here(tmp_path, teacher_workdir):
  """The record's cache_dir (machine-local) is used when that folder exists on this machine, else the default."""
  import shutil
  digits = load_split('digits', 'test[:20]')
  folder = tmp_path / 'digits_folder'
  for split in ('train', 'test'):
    for i, (image, label) in enumerate(zip(digits.images, digits.labels)):
      (folder / split / digits.class_names[label]).mkdir(parents=True, exist_ok=True)
      Image.fromarray(image[..., 0]).save(folder / split / digits.class_names[label] / f'{i}.png')
    for name in digits.class_names:  # every class folder, as the run's 10 classes
      (folder / split / name).mkdir(parents=True, exist_ok=True)
  for exists in (True, False):
    run, cache = tmp_path / f'run_{exists}', tmp_path / f'recorded_cache_{exists}'
    shutil.copytree(teacher_workdir, run)
    if exists:
      cache.mkdir()
    record = json.load(open(run / 'config.json'))
    record['data'].update(dataset=str(folder), eval_split='test', cache_dir=str(cache))
    json.dump(record, open(run / 'config.json', 'w'))
    home = tmp_path / f'home_{exists}'
    proc = run_main('--workdir', str(run), '--mode=eval', env={'HOME': str(home)}, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])['eval']['examples'] == 20
    assert os.path.isdir(cache / 'decoded') == exists  # decoded into the recorded folder where it exists...
    assert os.path.isdir(home / '.cache' / 'kdjax' / 'decoded') != exists  # ...else into the default one


def test_a_gray_split_is_evaluated_by_an_rgb_run_as_training_fed_it():
  from kdjax import run_data
  gray = load_split('digits', 'test[:4]')
  rgb = run_data.with_channels(gray, 3)
  assert rgb.images.shape[-1] == 3 and all((rgb.images[..., c] == gray.images[..., 0]).all() for c in range(3))
  assert run_data.with_channels(rgb, 1) is rgb and run_data.with_channels(gray, 1) is gray
  assert run_data.same_channels(gray, rgb, None)[0].images.shape[-1] == 3
