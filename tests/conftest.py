"""Shared pytest fixtures, and a JAX compilation cache for the whole run.

The cache is a temporary folder made once per pytest run and passed on by
environment, so the test processes and the subprocesses the tests start
(train.py, eval.py, the multi-host workers) compile each program once.
SSD_JAX_TEST_CACHE=0 turns it off; a JAX_COMPILATION_CACHE_DIR already set
is used as it is.
"""

import os
import shutil
import sys
import tempfile

import pytest

_CREATED_CACHE = None
if (os.environ.get('SSD_JAX_TEST_CACHE', '1') != '0'
    and 'JAX_COMPILATION_CACHE_DIR' not in os.environ):
  _CREATED_CACHE = tempfile.mkdtemp(prefix='ssd_jax_test_jit_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CREATED_CACHE
  # Small programs too: the suite compiles many of them, each many times.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
  if 'jax' in sys.modules:  # a plugin imported JAX before the env was set
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', _CREATED_CACHE)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


# The suite compiles hundreds of small programs and runs each a few times:
# LLVM's optimisation of the generated CPU code costs more than it saves
# here. (It changes no numbers: the HLO passes are the same and XLA:CPU
# compiles without fast-math either way.) SSD_JAX_TEST_FAST_COMPILE=0 keeps
# the default.
if (os.environ.get('SSD_JAX_TEST_FAST_COMPILE', '1') != '0' and
    'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()


def pytest_unconfigure(config):
  del config
  if _CREATED_CACHE and 'PYTEST_XDIST_WORKER' not in os.environ:
    shutil.rmtree(_CREATED_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def ssd300_config():
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  config = ssd300_voc.get_config()
  config.model.backbone.pretrained = ''
  return config


@pytest.fixture(scope='session')
def ssd512_config():
  from configs import ssd512_voc  # pylint: disable=g-import-not-at-top
  config = ssd512_voc.get_config()
  config.model.backbone.pretrained = ''
  return config


@pytest.fixture(scope='session')
def tiny_shapes_root(tmp_path_factory):
  """Where the tiny shapes dataset (tests/tiny.py) is generated."""
  return tmp_path_factory.mktemp('shapes')


@pytest.fixture(scope='session')
def uninterrupted_tiny_run(tiny_shapes_root, tmp_path_factory):
  """(config, workdir) of a tiny shapes run of 44 iterations in this process,
  never interrupted: the reference of the resume and preemption tests."""
  from ssd_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_shapes_config  # pylint: disable=g-import-not-at-top
  config = tiny_shapes_config(tiny_shapes_root)
  config.solver.max_iter = 44
  workdir = tmp_path_factory.mktemp('uninterrupted')
  trainer.train_and_evaluate(config, str(workdir))
  return config, workdir


# The files that take longest run first: pytest-xdist (--dist loadfile) hands
# files out in collection order, once its reordering by number of tests is
# off (it sent the three-test multi-host file, the longest, out last), so a
# long file collected late no longer keeps one worker busy after the other
# has finished.
_LONGEST_FIRST = ('test_multihost.py', 'test_trainer.py', 'test_preemption.py',
                  'test_model_zoo.py', 'test_eval_cli.py',
                  'test_cpu_kernels.py', 'test_memory.py',
                  'test_efficientnet.py', 'test_coco_eval.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist >= 3.6
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  del session, config
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a file is kept
