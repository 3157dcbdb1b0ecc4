"""The training report of a workdir: plots and a README, readable offline.

Reads only the workdir's own files, so it works on a run that is still
training and on one copied from a cluster:
  W/log.txt            the reference's log lines (losses, lr, time)
  W/eval/<set>_<step>.json   each evaluation (VOC mAP or COCO AP)
  W/tf_logs/           TensorBoard events (evaluation scalars, where a run
                       has no eval JSON)
  W/config.json        the run's config
and writes W/report/: loss.png (total, regression and classification loss,
the log's window means, against the iteration), lr.png, metrics.png (mAP or
COCO AP at each evaluation, and the last evaluation's per-class AP as bars)
and README.md (the pictures, the config, the first and last log lines, the
total time and seconds per iteration, the final per-class table).
"""

import dataclasses
import datetime
import glob
import json
import os
import re

_FLOAT = r'[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)'
_LOG_LINE = re.compile(
    r'^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ \S+ INFO: iter: '
    rf'(?P<iteration>\d+), lr: (?P<lr>{_FLOAT}), total_loss: '
    rf'(?P<total_loss>{_FLOAT}) \({_FLOAT}\), reg_loss: (?P<reg_loss>{_FLOAT})'
    rf' \({_FLOAT}\), cls_loss: (?P<cls_loss>{_FLOAT}) \({_FLOAT}\), time: '
    rf'(?P<seconds>{_FLOAT}) ')
_TIMESTAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ')
_EVAL_FILE = re.compile(r'^(?P<dataset>.+)_(?P<step>\d+)\.json$')
REPORT_DIR = 'report'


@dataclasses.dataclass
class TrainingLog:
  """The iteration lines of W/log.txt, in file order (a resumed run appends).

  iterations, lr, total_loss, reg_loss, cls_loss, seconds: one entry per
  logged iteration (the window means the line prints; `seconds` the window
  mean time per iteration). first_line / last_line: the file's first and
  last lines; start / end: their timestamps.
  """
  iterations: list
  lr: list
  total_loss: list
  reg_loss: list
  cls_loss: list
  seconds: list
  first_line: str = ''
  last_line: str = ''
  start: datetime.datetime = None
  end: datetime.datetime = None


def _timestamp(line):
  match = _TIMESTAMP.match(line)
  return (datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S')
          if match else None)


def read_log(path):
  """Parses a training log (see TrainingLog); missing file -> empty log."""
  log = TrainingLog([], [], [], [], [], [])
  if not os.path.exists(path):
    return log
  with open(path, errors='replace') as f:
    lines = [line.rstrip('\n') for line in f if line.strip()]
  for line in lines:
    match = _LOG_LINE.match(line)
    if match:
      log.iterations.append(int(match['iteration']))
      for name in ('lr', 'total_loss', 'reg_loss', 'cls_loss', 'seconds'):
        getattr(log, name).append(float(match[name]))
  # Multi-line records (the config dump, the AP table) continue without a
  # timestamp: the first and last lines are those that carry one.
  stamped = [line for line in lines if _timestamp(line)]
  if stamped:
    log.first_line, log.last_line = stamped[0], stamped[-1]
    log.start, log.end = _timestamp(stamped[0]), _timestamp(stamped[-1])
  return log


def _headline(record):
  """(name, value) of an evaluation record: VOC 'mAP' or COCO 'AP'."""
  if 'map' in record:
    return 'mAP', record['map']
  return 'AP', record.get('AP')


def read_evaluations(workdir):
  """{dataset: [record, ...] by step} from W/eval/<dataset>_<step>.json.

  Falls back to the TensorBoard scalars metrics/<dataset>/mAP (or /AP) of
  W/tf_logs when there is no eval JSON.
  """
  evaluations = {}
  for path in glob.glob(os.path.join(workdir, 'eval', '*.json')):
    match = _EVAL_FILE.match(os.path.basename(path))
    if not match or path.endswith('_bbox.json'):
      continue
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue  # a file being written or damaged: the rest still report
    record.setdefault('step', int(match['step']))
    evaluations.setdefault(match['dataset'], []).append(record)
  if not evaluations:
    evaluations = _tensorboard_evaluations(os.path.join(workdir, 'tf_logs'))
  return {name: sorted(records, key=lambda r: r['step'])
          for name, records in sorted(evaluations.items())}


def _tensorboard_evaluations(logdir):
  if not os.path.isdir(logdir):
    return {}
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0,
                             event_accumulator.SCALARS: 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  # clu's writers store scalars as summary tensors; older writers as scalars.
  values = {tag: [(e.step, float(e.value)) for e in accumulator.Scalars(tag)]
            for tag in tags.get('scalars', [])}
  for tag in tags.get('tensors', []):
    values[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                   for e in accumulator.Tensors(tag)]
  evaluations = {}
  for tag, events in values.items():
    parts = tag.split('/')
    if len(parts) == 3 and parts[0] == 'metrics' and parts[2] in ('mAP',
                                                                   'AP'):
      key = 'map' if parts[2] == 'mAP' else 'AP'
      evaluations.setdefault(parts[1], []).extend(
          {'step': int(step), key: value} for step, value in events)
  return evaluations


def _plot(path, series, xlabel, ylabel, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
  for label, (x, y) in series.items():
    axes.plot(x, y, label=label, marker='.' if len(x) < 30 else None)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  if len(series) > 1:
    axes.legend()
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def _plot_metrics(path, evaluations):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  last = _last_per_class(evaluations)
  columns = 2 if last else 1
  figure, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.5),
                              dpi=100, squeeze=False)
  curve = axes[0, 0]
  for name, records in evaluations.items():
    metric, _ = _headline(records[0])
    curve.plot([r['step'] for r in records],
               [_headline(r)[1] for r in records], marker='o',
               label=f'{name} {metric}')
  curve.set_xlabel('iteration')
  curve.set_title('evaluation')
  curve.grid(alpha=0.3)
  if evaluations:
    curve.legend()
  if last:
    name, record = last
    classes = [c for c, ap in record['ap'].items() if ap is not None]
    bars = axes[0, 1]
    bars.barh(classes, [record['ap'][c] for c in classes])
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_title(f'{name}, iteration {record["step"]}: AP per class')
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def _last_per_class(evaluations):
  """(dataset, last record) of the first dataset with per-class APs."""
  for name, records in evaluations.items():
    if records and isinstance(records[-1].get('ap'), dict):
      return name, records[-1]
  return None


def _duration(log):
  if log.start and log.end:
    return log.end - log.start
  return None


def write_report(workdir):
  """Writes W/report/ (module docstring) and returns the README's path."""
  out = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  log = read_log(os.path.join(workdir, 'log.txt'))
  evaluations = read_evaluations(workdir)
  x = log.iterations
  _plot(os.path.join(out, 'loss.png'),
        {'total_loss': (x, log.total_loss), 'reg_loss': (x, log.reg_loss),
         'cls_loss': (x, log.cls_loss)},
        'iteration', 'loss (window mean)', 'training loss')
  _plot(os.path.join(out, 'lr.png'), {'lr': (x, log.lr)}, 'iteration',
        'learning rate', 'learning rate')
  _plot_metrics(os.path.join(out, 'metrics.png'), evaluations)

  lines = [f'# Training report: {os.path.abspath(workdir)}', '',
           f'Written {datetime.datetime.now():%Y-%m-%d %H:%M:%S} from the '
           'workdir\'s log, evaluation files and config.', '']
  if log.iterations:
    duration = _duration(log)
    span = log.iterations[-1] - log.iterations[0]
    lines.append(f'Iterations {log.iterations[0]} to {log.iterations[-1]} '
                 f'logged ({len(log.iterations)} log lines).')
    if duration is not None:
      lines.append(f'Total time {duration} (first to last log line)'
                   + (f', {duration.total_seconds() / span:.3f} s per '
                      'iteration.' if span > 0 else '.'))
  else:
    lines.append('No iteration logged yet.')
  lines += ['', '![loss](loss.png)', '', '![learning rate](lr.png)', '',
            '![evaluation](metrics.png)', '']
  for name, records in evaluations.items():
    metric, _ = _headline(records[0])
    lines += [f'## {name}', '', f'| iteration | {metric} |', '|---|---|']
    lines += [f'| {r["step"]} | {_headline(r)[1]:.4f} |' for r in records
              if _headline(r)[1] is not None]
    last = records[-1]
    if isinstance(last.get('ap'), dict):
      lines += ['', f'Per class at iteration {last["step"]}:', '',
                '| class | AP |', '|---|---|']
      lines += [f'| {c} | {"-" if ap is None else f"{ap:.4f}"} |'
                for c, ap in last['ap'].items()]
    elif 'AP' in last:
      lines += ['', f'At iteration {last["step"]}: ' + ', '.join(
          f'{k} {v:.3f}' for k, v in last.items() if k != 'step')]
    lines.append('')
  lines += ['## Log', '', 'First line:', '', '```', log.first_line, '```', '',
            'Last line:', '', '```', log.last_line, '```', '']
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      lines += ['## Config', '', '```json', f.read().strip(), '```', '']
  path = os.path.join(out, 'README.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path
