"""The one-call GPU plans (`benchmarks/device_session.py`): the runner's deadline, failures and dependencies, and
that every step of every plan would start (flags parse, configs validate) -- checked here, where it costs nothing,
instead of on the GPU's 15 minutes."""
import json
import os
import sys
import time

import pytest

from benchmarks import device_session


def _python(code: str) -> list[str]:
  return [sys.executable, '-c', code]


def test_runner_keeps_going_past_failures_and_respects_budget_and_needs(tmp_path):
  result = tmp_path / 'result.json'
  steps = [
      device_session.Step('ok', _python(f'import json; json.dump({{"top1": 0.9}}, open({str(result)!r}, "w"))'), 30,
                          [str(result)]),
      device_session.Step('fails', _python('raise SystemExit(3)'), 30),
      device_session.Step('slow', _python('import time; time.sleep(30)'), 1.5),
      device_session.Step('after_failure', _python('print(1)'), 30, needs=('fails',)),
      device_session.Step('after_ok', _python('print("ran")'), 30, needs=('ok',)),
  ]
  records = device_session.run_plan(steps, str(tmp_path / 'out'), budget_s=60, min_step_s=1)
  status = {r['step']: r['status'] for r in records}
  assert status == {'ok': 'ok', 'fails': 'failed (exit 3)', 'slow': 'timed out after 2 s',
                    'after_failure': 'skipped: fails did not finish', 'after_ok': 'ok'}
  assert records[0]['results'] == {str(result): {'top1': 0.9}}
  saved = json.load(open(tmp_path / 'out' / 'session.json'))
  assert [r['status'] for r in saved] == [r['status'] for r in records]
  assert 'ran' in open(tmp_path / 'out' / 'session.log').read()
  summary = open(tmp_path / 'out' / 'session.md').read()
  assert '| slow | timed out after 2 s |' in summary
  assert records[4]['tail'] == 'ran' and '## after_ok: last lines of its output' in summary


def test_a_timed_out_step_takes_its_children_with_it(tmp_path):
  """The peer runs as a child of a step: a timeout must not leave it holding the GPU for the next step."""
  pid_file = tmp_path / 'child.pid'
  code = (f'import subprocess, sys, time; child = subprocess.Popen([sys.executable, "-c", "import time; '
          f'time.sleep(60)"]); open({str(pid_file)!r}, "w").write(str(child.pid)); time.sleep(60)')
  records = device_session.run_plan([device_session.Step('parent', _python(code), 3)], str(tmp_path / 'out'),
                                    budget_s=30, min_step_s=1)
  assert records[0]['status'] == 'timed out after 3 s'
  child = int(pid_file.read_text())
  deadline = time.monotonic() + 5
  while _alive(child) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(child)


def _alive(pid: int) -> bool:
  try:
    os.waitpid(pid, os.WNOHANG)  # reap it if it is ours (it is not: its parent was killed, init reaps it)
  except ChildProcessError:
    pass
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'  # a zombie is dead
  except FileNotFoundError:
    return False


def test_runner_skips_what_the_deadline_leaves_no_time_for(tmp_path):
  steps = [device_session.Step('first', _python('import time; time.sleep(1.2)'), 30),
           device_session.Step('second', _python('print(1)'), 30)]
  records = device_session.run_plan(steps, str(tmp_path), budget_s=1.5, min_step_s=1)
  assert records[1]['status'] == 'skipped: no time left'


@pytest.mark.parametrize('plan', sorted(device_session.PLANS))
def test_every_plan_step_would_start(plan):
  args = device_session.parse_args([plan])
  steps = device_session.preflight(device_session.PLANS[plan](args))
  rows = device_session.check(steps)
  assert rows and all(row['ok'] for row in rows), rows
  assert [s.name for s in steps[:2]] == ['versions', 'smoke'] and all('smoke' in s.needs for s in steps[2:])


def test_the_preflight_runs_and_gates_the_plan(tmp_path, monkeypatch):
  """Here on the CPU: the versions are printed and the one-epoch bf16 tiny run finishes; a plan step that needs it
  runs after it."""
  monkeypatch.setattr(device_session, 'RUNS', str(tmp_path / 'runs'))
  monkeypatch.setattr(device_session, 'CACHE', str(tmp_path / 'cache'))
  steps = device_session.preflight([device_session.Step('plan_step', _python('print("plan ran")'), 30)])
  records = device_session.run_plan(steps, str(tmp_path / 'out'), budget_s=300, min_step_s=1)
  assert [r['status'] for r in records] == ['ok', 'ok', 'ok'], records
  assert 'jax 0.' in records[0]['tail'] and 'devices' in records[0]['tail']
  summary = records[1]['results'][str(tmp_path / 'runs' / 'smoke' / 'summary.json')]
  assert summary['steps'] > 0 and summary['eval_top1'] > 0.1
