import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax.training import checkpointing
from tests.tiny import tiny_config


def test_config_round_trip_keeps_tuples(tmp_path):
  config = tiny_config()
  checkpointing.save_config(str(tmp_path), config)
  loaded = checkpointing.load_config(str(tmp_path))
  assert loaded.data.train == ('voc_2007_trainval', 'voc_2012_trainval')
  assert loaded.model.priors.aspect_ratios == ((2,), (2, 3), (2,), (2,))
  assert loaded.to_dict() == config.to_dict()


def test_missing_config_names_the_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpointing.load_config(str(tmp_path / 'nowhere'))


def test_save_restore_keep_last_n(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  assert checkpointer.latest_step() is None
  for step in (10, 20, 30):
    checkpointer.save(step, {'w': jnp.full((3,), float(step))},
                      opt_state={'m': jnp.zeros(2)}, meta={'epoch': step // 10})
  checkpointer.wait()
  assert checkpointer.all_steps() == [20, 30]
  target = {'w': jnp.zeros(3)}
  restored = checkpointer.restore(None, target, opt_state={'m': jnp.ones(2)})
  np.testing.assert_array_equal(np.asarray(restored['model']['w']), [30.0] * 3)
  np.testing.assert_array_equal(np.asarray(restored['opt_state']['m']), [0, 0])
  assert restored['meta'] == {'epoch': 3, 'step': 30}
  older = checkpointer.restore(20, target)
  assert 'opt_state' not in older
  np.testing.assert_array_equal(np.asarray(older['model']['w']), [20.0] * 3)
  with pytest.raises(FileNotFoundError, match='step 10'):
    checkpointer.restore(10, target)
  checkpointer.close()
