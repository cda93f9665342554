"""Export, eval and predict: a trained model leaves the training code behind and gives the same answers."""
import json
import os

import numpy as np
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
