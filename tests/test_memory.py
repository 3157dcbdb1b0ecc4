"""The training loop does not leak host memory (a bound on its growth)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Growth of the median RSS from the start to the end of the measured window,
# in MiB. RSS moves by a few MiB either way as the allocator takes and
# returns memory; keeping one batch per step (about 0.3 MiB here) would grow
# it by ~100 MiB over the window.
GROWTH_BOUND_MIB = 25


def test_host_memory_does_not_grow_after_warmup(tmp_path):
  # In a process of its own: a test worker's RSS also holds what the tests
  # before this one left to the allocator, and moves with it.
  # The warm-up holds the first evaluation and the first save (their
  # compilations and Orbax's threads are one-off growth, not a leak).
  out = tmp_path / 'memory.json'
  subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'memory.py'),
       '--steps=600', '--eval_every=100', '--save_every=100',
       '--log_every=10', '--warmup=250', f'--out={out}'],
      check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      timeout=900)
  result = json.loads(out.read_text())
  assert len(result['rss']) == 60
  window = [mib for step, mib in result['rss'] if step > 250]
  growth = np.median(window[-10:]) - np.median(window[:10])
  print(f'RSS growth {growth:.1f} MiB over steps 250-600, slope '
        f'{result["rss_slope_mib_per_1000"]:.1f} MiB / 1,000 steps')
  assert growth < GROWTH_BOUND_MIB, result['rss']


def test_slope_of_a_leak_is_seen():
  leak = [(s, 100 + 0.01 * s) for s in range(0, 1000, 10)]
  assert memory.slope_per_1000(leak, warmup=100) == pytest.approx(10.0)
