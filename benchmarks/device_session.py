"""One prepared GPU call per session: a plan's benchmark and experiment commands under one deadline.

Why: a session is lent a GPU for 15 minutes of device time in all (machine start included), one call may run 10
minutes, and only 8 files come back from it. So each issue's GPU work is one plan, prepared and checked here, run
as a single call: every step gets a time budget (cut to what is left of `--budget`), a failed or timed-out step does
not stop the next one, and everything lands in three files under `--out`: session.log (all output), session.json
(each step's command, exit status, wall time and the JSON its tools wrote) and session.md (a summary with each
step's results table). Only the standard library is imported at the top: the wheels the GPU machine lacks (clu,
ml_collections, tfds) are installed by the runner itself before the first step. Every plan starts with `preflight`
(the library versions, then a one-epoch bf16 tiny run that every later step needs), so a version mismatch costs
seconds of the session, not its minutes.

Here (CPU), before the call:
  python -m benchmarks.device_session PLAN --prepare      # fills the git-ignored carry/, prints the call to make
  python -m benchmarks.device_session PLAN --check        # every step's flags parse and its config validates
On the device (the command --prepare prints):
  python3 benchmarks/device_session.py PLAN --out $OUT

Plans: perf (issue 5: side-by-side with the PyTorch peer, steps, roofline, largest batch), imagenette (issue 3:
ResNet-34 teacher, then the medium student on data only and stage-wise, 3 seeds each), cifar10_kd (issue 4: the
ResNet-18 teacher, the CE student and the alpha x T grid, seeds).
"""
import argparse
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared')
CARRY = 'carry'
CARRY_LIMIT_MIB = 64
TAIL_LINES = 15  # of each step's output in session.md: enough for a benchmark's table or a traceback's end
WHEELS = os.path.join(CARRY, 'wheels-gpu')
SITE = '/tmp/kdjax-site'
CACHE = '/tmp/kdjax-cache'
RUNS = '/tmp/kdjax-runs'
CIFAR10 = os.path.join(CARRY, 'data', 'cifar10-jpeg.tar.gz')
IMAGENETTE_128 = os.path.join(CARRY, 'data', 'imagenette2-128.tar.gz')
PEER = os.path.join(CARRY, 'bench', 'torch_kd_peer.py')
# Wheels left behind: the plans read local archives, and kdjax imports tensorflow_datasets only for tfds names
# (9 of the 10 MB; checked on CPU by a default run with tensorflow_datasets and tensorflow made unimportable).
SKIPPED_WHEELS = ('tensorflow_datasets-', 'array_record-', 'tensorflow_metadata-')


@dataclasses.dataclass
class Step:
  """One command of a plan: `argv` runs from the repository root; `budget_s` caps its wall time; `results` are
  files (globs, relative to the root) whose contents go into session.json/.md; `env` adds to the environment;
  `needs` names earlier steps that must have succeeded (a student is not distilled from a half-trained teacher)."""
  name: str
  argv: list[str]
  budget_s: float
  results: list[str] = dataclasses.field(default_factory=list)
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()


def _main_py(*args: str) -> list[str]:
  return [sys.executable, 'main.py', *args, f'--config.data.cache_dir={CACHE}']


def _module(name: str, *args: str) -> list[str]:
  return [sys.executable, '-m', f'benchmarks.{name}', *args]


def plan_perf(args) -> list[Step]:
  """Issue 5: kdjax/peer ratios end to end, the step table, the roofline gap and the largest 224 px batch."""
  sbs = os.path.join(RUNS, 'side_by_side.json')
  return [
      Step('side_by_side', _module('side_by_side', '--data', CIFAR10, '--peer', PEER, '--epochs-teacher', '30',
                                   '--epochs-student', '15', '--kd', '0.5:4:0.02', '--cache-dir', CACHE,
                                   '--workdir', os.path.join(RUNS, 'sbs'), '--json', sbs), 340,
           [sbs, os.path.join(RUNS, 'sbs', '*', '*', 'summary.json')]),
      # student_kd_cached is left out: with crop+flip its table is 162 views x 50,000 teacher passes, which does not
      # fit this step's time; the cifar10_kd plan's grid runs the cache instead.
      Step('bench_steps', _module('bench_steps', '--phases', 'teacher,student_ce,student_kd',
                                  '--json', os.path.join(RUNS, 'bench_steps.json')), 60,
           [os.path.join(RUNS, 'bench_steps.json')]),
      Step('roofline', _module('roofline', '--json', os.path.join(RUNS, 'roofline.json')), 40,
           [os.path.join(RUNS, 'roofline.json')]),
      Step('max_batch', _module('max_batch', '--teacher', 'resnet34', '--student', 'resnet34_medium',
                                '--image-size', '224', '--peer', PEER, '--peer-start', '256', '--tolerance', '0.1',
                                '--json', os.path.join(RUNS, 'max_batch.json')),
           240, [os.path.join(RUNS, 'max_batch.json')], env={'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.95'}),  # the rest
  ]


def plan_imagenette(args) -> list[Step]:
  """Issue 3: the from-scratch teacher at 128 px, then data-only vs stage-wise medium students, 3 seeds each."""
  data = [f'--config.data.dataset={IMAGENETTE_128}']
  teacher = os.path.join(RUNS, 'imagenette_teacher')
  return [
      Step('teacher', _main_py('--config', 'configs/imagenette_teacher.py', '--workdir', teacher, *data,
                               *([f'--config.phases.train.epochs={args.teacher_epochs}'] if args.teacher_epochs
                                 else [])), 200,
           [os.path.join(teacher, 'summary.json')]),
      Step('student_data_only', _main_py('--config', 'configs/imagenette_student.py:repeats', '--workdir',
                                         os.path.join(RUNS, 'student'), *data), 120,
           [os.path.join(RUNS, 'student', 'results.md'), os.path.join(RUNS, 'student', 'results.json')]),
      Step('student_stagewise', _main_py('--config', 'configs/imagenette_stagewise.py:repeats', '--workdir',
                                         os.path.join(RUNS, 'stagewise'), *data,
                                         f'--config.teacher.workdir={teacher}'), 240,
           [os.path.join(RUNS, 'stagewise', 'results.md'), os.path.join(RUNS, 'stagewise', 'results.json')],
           needs=('teacher',)),
      # Did the stage phases reach the teacher's maps? (per-map relative error; printed into session.md)
      Step('stagewise_match', _main_py('--config', 'configs/imagenette_stagewise.py', '--workdir',
                                       os.path.join(RUNS, 'stagewise', 'seed_0'), *data,
                                       f'--config.teacher.workdir={teacher}', '--mode=match'), 30,
           needs=('student_stagewise',)),
  ]


def plan_cifar10_kd(args) -> list[Step]:
  """Issue 4: the ResNet-18 teacher, the CE baseline over 3 seeds and the alpha x T grid (teacher-output cache)."""
  data = [f'--config.data.dataset={CIFAR10}']
  teacher = os.path.join(RUNS, 'cifar10_teacher')
  return [
      Step('teacher', _main_py('--config', 'configs/cifar10_teacher.py', '--workdir', teacher, *data), 100,
           [os.path.join(teacher, 'summary.json')]),
      Step('student_ce', _main_py('--config', 'configs/cifar10_student.py', '--workdir',
                                  os.path.join(RUNS, 'student_ce'), *data, '--config.suite=repeats',
                                  '--config.repeats.seeds=(0,1,2)'), 50,
           [os.path.join(RUNS, 'student_ce', 'results.md'), os.path.join(RUNS, 'student_ce', 'results.json')]),
      Step('kd_grid', _main_py('--config', 'configs/cifar10_kd_grid.py', '--workdir', os.path.join(RUNS, 'grid'),
                               *data, f'--config.teacher.workdir={teacher}', '--config.teacher.cache=True'), 410,
           [os.path.join(RUNS, 'grid', 'results.md'), os.path.join(RUNS, 'grid', 'results.json')],
           needs=('teacher',)),
  ]


# Printed first into session.log: the versions the GPU machine ships are not those CI tests (jax 0.11 there).
VERSIONS = ('import importlib, jax\n'
            'for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "clu", "ml_collections", '
            '"tensorboard", "PIL", "torch"):\n'
            '  try:\n'
            '    print(name, getattr(importlib.import_module(name), "__version__", "?"))\n'
            '  except ImportError as error:\n'
            '    print(name, "missing:", error)\n'
            'print("devices", jax.devices())\n')


def preflight(steps: list[Step]) -> list[Step]:
  """The plan behind two checks that fail in seconds rather than minutes: the library versions, and a one-epoch
  bf16 run of the tiny test config (build, step, eval, checkpoint, summary); every step of the plan needs it."""
  smoke = Step('smoke', _main_py('--config', 'tests/tiny_configs/tiny.py:ce', '--workdir',
                                 os.path.join(RUNS, 'smoke'), '--config.compute_dtype=bfloat16',
                                 '--config.phases.train.epochs=1'), 90, [os.path.join(RUNS, 'smoke', 'summary.json')])
  return [Step('versions', [sys.executable, '-c', VERSIONS], 30), smoke,
          *(dataclasses.replace(step, needs=('smoke', *step.needs)) for step in steps)]


PLANS = {'perf': plan_perf, 'imagenette': plan_imagenette, 'cifar10_kd': plan_cifar10_kd}
# What each plan needs carried, as (destination under carry/, how to make it here).
CARRIED = {
    'perf': [(CIFAR10, 'copy:data/cifar10-jpeg.tar.gz'), (PEER, 'copy:bench/torch_kd_peer.py')],
    'imagenette': [(IMAGENETTE_128, 'compact:data/imagenette2-224.tar.gz')],
    'cifar10_kd': [(CIFAR10, 'copy:data/cifar10-jpeg.tar.gz')],
}


# ---------------------------------------------------------------------------------------------------------------
# Here: prepare carry/ and check the steps.

def prepare(plan: str) -> dict:
  """Fill carry/ with the wheels and the plan's data; refuse if it would not travel (64 MiB); return the call."""
  shutil.rmtree(WHEELS, ignore_errors=True)  # exactly the wheels wanted now, none left from an earlier list
  os.makedirs(WHEELS)
  for wheel in glob.glob(os.path.join(SHARED, 'wheels-gpu', '*.whl')):
    if not os.path.basename(wheel).startswith(SKIPPED_WHEELS):
      shutil.copy2(wheel, WHEELS)
  for destination, how in CARRIED[plan]:
    kind, source = how.split(':', 1)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if os.path.exists(destination):
      continue
    if kind == 'copy':
      shutil.copy2(os.path.join(SHARED, source), destination)
    else:  # a 128 px copy made by kdjax's own command
      subprocess.run([sys.executable, '-m', 'kdjax.data.compact', os.path.join(SHARED, source), destination,
                      '--size', '128', '--quality', '80'], check=True)
  needed = [WHEELS] + [d for d, _ in CARRIED[plan]]
  size = sum(os.path.getsize(f) for path in needed
             for f in ([path] if os.path.isfile(path) else glob.glob(os.path.join(path, '*'))))
  if size > (CARRY_LIMIT_MIB - 2) * 2**20:  # leave room for the working tree itself
    raise SystemExit(f'{plan} needs {size / 2**20:.1f} MiB carried, over the {CARRY_LIMIT_MIB} MiB limit')
  return dict(carry=needed, carry_mib=round(size / 2**20, 1),
              command=f'PYTHONUNBUFFERED=1 python3 benchmarks/device_session.py {plan} --out $OUT', timeout_s=600)


def check(steps: list[Step]) -> list[dict]:
  """Each step's flags parse and, for main.py, its config validates (`--mode=check`); nothing runs."""
  rows = []
  for step in steps:
    if step.argv[1] == '-c':
      compile(step.argv[2], step.name, 'exec')  # a SyntaxError here, not there
      rows.append(dict(step=step.name, ok=True, why=''))
      continue
    if step.argv[1] == 'main.py':
      proc = subprocess.run([*step.argv, '--mode=check'], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **step.env})
      ok, why = proc.returncode == 0, (proc.stderr.strip().splitlines() or [''])[-1]
    else:
      module = __import__(step.argv[2], fromlist=['parse_args'])
      try:
        module.parse_args(step.argv[3:])
        ok, why = True, ''
      except SystemExit as error:
        ok, why = False, f'bad flags (exit {error.code})'
    rows.append(dict(step=step.name, ok=ok, why=why if not ok else ''))
  return rows


# ---------------------------------------------------------------------------------------------------------------
# There: run the plan.

def install_wheels(log) -> None:
  """pip-install carry/wheels-gpu into a private site dir when clu or ml_collections is missing."""
  import importlib.util
  if all(importlib.util.find_spec(m) for m in ('clu', 'ml_collections')) or not glob.glob(f'{WHEELS}/*.whl'):
    return
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
                  '--no-cache-dir', '--upgrade', '--target', SITE, *glob.glob(f'{WHEELS}/*.whl')],
                 check=True, stdout=log, stderr=subprocess.STDOUT)
  os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [SITE, os.environ.get('PYTHONPATH', '')]))


def read_result(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read()
  if path.endswith('.json'):
    try:
      return json.loads(text)
    except json.JSONDecodeError:
      return text
  return text


def run_plan(steps: list[Step], out: str, budget_s: float, min_step_s: float = 20) -> list[dict]:
  """Run the steps in order under one deadline; write session.log/.json/.md into `out` after every step (a call
  cut short still returns what finished)."""
  os.makedirs(out, exist_ok=True)
  deadline = time.monotonic() + budget_s
  records = []
  with open(os.path.join(out, 'session.log'), 'a') as log:
    install_wheels(log)
    for step in steps:
      left = deadline - time.monotonic()
      record = dict(step=step.name, command=' '.join(step.argv), budget_s=step.budget_s)
      failed = [r['step'] for r in records if r['step'] in step.needs and r['status'] != 'ok']
      if failed:
        record.update(status=f'skipped: {", ".join(failed)} did not finish')
      elif left < min_step_s:
        record.update(status='skipped: no time left')
      else:
        limit = min(step.budget_s, left)
        print(f'\n=== {step.name} (at most {limit:.0f} s): {record["command"]}', file=log, flush=True)
        t0, start = time.monotonic(), log.tell()
        # Its own process group, so that a timeout also stops the children (the peer) that may hold the GPU.
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **step.env}, start_new_session=True)
        try:
          returncode = proc.wait(timeout=limit)
          record.update(status='ok' if returncode == 0 else f'failed (exit {returncode})')
        except subprocess.TimeoutExpired:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          record.update(status=f'timed out after {limit:.0f} s')
        record.update(wall_s=round(time.monotonic() - t0, 1), tail=_tail(log.name, start, TAIL_LINES))
      record['results'] = {path: read_result(path) for pattern in step.results for path in glob.glob(pattern)}
      records.append(record)
      write_session(out, records)
      print(f'{step.name}: {record["status"]} ({record.get("wall_s", 0)} s)', flush=True)
  return records


def _tail(path: str, start: int, lines: int) -> str:
  """The last `lines` lines a step wrote (its printed table, or its error), read back from the session log."""
  with open(path, errors='replace') as f:
    f.seek(start)
    return '\n'.join(f.read().splitlines()[-lines:])


def write_session(out: str, records: list[dict]) -> None:
  with open(os.path.join(out, 'session.json'), 'w') as f:
    json.dump(records, f, indent=1, default=str)
  lines = ['| step | status | wall s |', '|---|---|---|']
  lines += [f'| {r["step"]} | {r["status"]} | {r.get("wall_s", "—")} |' for r in records]
  for record in records:
    if record.get('tail'):
      lines += ['', f'## {record["step"]}: last lines of its output', '', '```', record['tail'], '```']
    for path, content in record['results'].items():
      text = content if isinstance(content, str) else json.dumps(content, indent=1, default=str)
      if path.endswith('.md') or os.path.basename(path) == 'summary.json':  # the tables and run summaries
        lines += ['', f'## {record["step"]}: {os.path.basename(path)}', '', text.strip()]
  with open(os.path.join(out, 'session.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('plan', choices=sorted(PLANS))
  parser.add_argument('--out', default=os.environ.get('OUT', ''), help='where the 3 session files go ($OUT)')
  parser.add_argument('--budget', type=float, default=560, help='seconds for all steps (a call may run 600)')
  parser.add_argument('--teacher-epochs', type=float, default=0,
                      help='imagenette: the teacher\'s epochs (0 = the config\'s, 80)')
  parser.add_argument('--prepare', action='store_true', help='fill carry/ here and print the device call')
  parser.add_argument('--check', action='store_true', help='check every step\'s flags and config here')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.chdir(ROOT)
  steps = preflight(PLANS[args.plan](args))
  if args.prepare:
    result = prepare(args.plan)
  elif args.check:
    result = check(steps)
    if not all(row['ok'] for row in result):
      print(json.dumps(result, indent=1))
      raise SystemExit(f'{args.plan}: some steps would fail; see above')
  else:
    if not args.out:
      raise SystemExit('--out (or $OUT) is needed')
    result = run_plan(steps, args.out, args.budget)
  print(json.dumps(result, indent=1, default=str))
  return result


if __name__ == '__main__':
  if __package__ in (None, ''):
    sys.path.insert(0, ROOT)
  main()
