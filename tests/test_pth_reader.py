"""ssd_jax.interop.pth_reader: files of torch.save read back without PyTorch.

Files are written with torch in this process and read in a subprocess where
`import torch` fails, then compared bit for bit with the tensors saved.
"""

import collections
import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

from ssd_jax.interop import pth_reader
from tests.tiny import reference_state_dict, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ('zip', 'legacy')

# Runs in a subprocess: reads argv[2:] with torch unimportable, pickles the
# results to argv[1].
_READ_WITHOUT_TORCH = '''
import pickle, sys
sys.modules['torch'] = None  # `import torch` raises ImportError
from ssd_jax.interop import pth_reader
from tests.tiny import reference_state_dict, tiny_config
objects = [pth_reader.load(path) for path in sys.argv[2:]]
assert sys.modules['torch'] is None
with open(sys.argv[1], 'wb') as f:
  pickle.dump(objects, f)
'''


def _run_without_torch(code, *args):
  result = subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _read_without_torch(paths, tmp_path):
  out = str(tmp_path / 'read_back.pkl')
  _run_without_torch(_READ_WITHOUT_TORCH, out, *paths)
  with open(out, 'rb') as f:
    return pickle.load(f)


def _save(torch, obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == 'zip'))
  return str(path)


def _tensors(torch):
  """name -> tensor: every storage dtype, views, shared storages, edge cases."""
  gen = torch.Generator().manual_seed(0)
  tensors = {}
  for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    tensors[str(dtype)] = (torch.randn(3, 5, generator=gen) * 100).to(dtype)
  for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
    tensors[str(dtype)] = torch.randint(-100, 100, (7,), generator=gen,
                                        dtype=dtype)
  tensors['uint8'] = torch.randint(0, 256, (2, 4), generator=gen,
                                   dtype=torch.uint8)
  tensors['bool'] = torch.rand(2, 3, generator=gen) > 0.5
  # uint16 is pickled by _rebuild_tensor_v3 over an untyped storage.
  tensors['uint16'] = torch.randint(0, 65535, (5,), generator=gen).to(
      torch.uint16)
  base = torch.randn(4, 6, generator=gen)
  tensors['base'] = base
  # Views of base's storage: strides, an offset, stride 0.
  tensors['transposed'] = base.t()
  tensors['strided_slice'] = base[1:4:2, 1::2]
  tensors['row_at_offset_12'] = base[2]
  tensors['broadcast'] = base[0, :3].expand(4, 3)
  tensors['scalar'] = torch.tensor(3.25, dtype=torch.float64)
  tensors['empty'] = torch.zeros(0, 3)
  return tensors


def _checkpoint(torch):
  """A training checkpoint like the reference's, plus `_tensors`."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                            torch.nn.Conv2d(4, 2, 1))
  # Keys 'module.0.weight', ...: the state dict of a DDP-wrapped model.
  ddp_like = torch.nn.ModuleDict({'module': net})
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9,
                              weight_decay=5e-4)
  scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10, 20])
  net(torch.randn(1, 3, 5, 5)).sum().backward()
  optimizer.step()
  scheduler.step()
  return {'model': ddp_like.state_dict(), 'optimizer': optimizer.state_dict(),
          'scheduler': scheduler.state_dict(), 'iteration': 1234,
          'tensors': _tensors(torch)}


def _assert_same(theirs, ours, torch, where='obj'):
  """`ours` (read without torch) holds exactly what torch saved in `theirs`."""
  if isinstance(theirs, torch.Tensor):
    assert isinstance(ours, np.ndarray), where
    assert ours.dtype.name == str(theirs.dtype).split('.')[1], where
    assert ours.shape == tuple(theirs.shape), where
    assert ours.flags.c_contiguous and ours.flags.owndata, where
    expected = theirs.detach().contiguous().reshape(-1).view(torch.uint8)
    assert ours.tobytes() == expected.numpy().tobytes(), where
  elif isinstance(theirs, dict):
    assert isinstance(ours, dict) and list(ours) == list(theirs), where
    for key in theirs:
      _assert_same(theirs[key], ours[key], torch, f'{where}[{key!r}]')
  elif isinstance(theirs, (list, tuple)):
    assert type(ours) is type(theirs) and len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(theirs, ours)):
      _assert_same(a, b, torch, f'{where}[{i}]')
  else:
    assert type(ours) is type(theirs) and ours == theirs, where


@pytest.fixture(scope='module')
def saved_and_read(tmp_path_factory):
  """{format: (the object saved with torch, the object read without it)}."""
  torch = pytest.importorskip('torch')
  tmp_path = tmp_path_factory.mktemp('pth')
  checkpoint = _checkpoint(torch)
  paths = [_save(torch, checkpoint, tmp_path / f'{fmt}.pth', fmt)
           for fmt in FORMATS]
  return dict(zip(FORMATS, ((checkpoint, obj) for obj in
                            _read_without_torch(paths, tmp_path))))


@pytest.mark.parametrize('fmt', FORMATS)
def test_torch_save_reads_back_bit_identically_without_torch(saved_and_read,
                                                             fmt):
  torch = pytest.importorskip('torch')
  theirs, ours = saved_and_read[fmt]
  _assert_same(theirs, ours, torch)
  assert list(ours['model']) == ['module.0.weight', 'module.0.bias',
                                 'module.2.weight', 'module.2.bias']
  assert ours['iteration'] == 1234
  assert isinstance(ours['scheduler']['milestones'], collections.Counter)
  momentum = ours['optimizer']['state'][0]['momentum_buffer']
  assert momentum.shape == (4, 3, 3, 3) and np.abs(momentum).sum() > 0
  tensors = ours['tensors']
  np.testing.assert_array_equal(tensors['transposed'], tensors['base'].T)
  np.testing.assert_array_equal(tensors['broadcast'],
                                np.tile(tensors['base'][0, :3], (4, 1)))
  assert tensors['scalar'].shape == () and tensors['scalar'] == 3.25


def _big_endian_copy(torch, path, out):
  """`path` (zip, one storage per tensor in order) rewritten big-endian."""
  saved = torch.load(path, weights_only=True)
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, 'w') as dst:
    prefix = src.namelist()[0].split('/')[0]
    for name in src.namelist():
      data = src.read(name)
      if name == f'{prefix}/byteorder':
        data = b'big'
      elif name.startswith(f'{prefix}/data/'):
        tensor = list(saved.values())[int(name.rsplit('/', 1)[1])]
        array = np.frombuffer(data, f'u{tensor.element_size()}')
        data = array.byteswap().tobytes()
      dst.writestr(name, data)
  return str(out)


def test_big_endian_archive(tmp_path):
  torch = pytest.importorskip('torch')
  tensors = {k: v for k, v in _tensors(torch).items()
             if k in ('torch.float32', 'torch.float64', 'torch.bfloat16',
                      'torch.int16', 'torch.int64', 'bool', 'uint16')}
  little = _save(torch, tensors, tmp_path / 'little.pth', 'zip')
  big = _big_endian_copy(torch, little, tmp_path / 'big.pth')
  # torch itself byteswaps the file back: it is a valid big-endian archive.
  # (Not the uint16 tensor: torch swaps by storage type, and the untyped
  # storage of a _rebuild_tensor_v3 tensor has 1-byte elements.)
  for key, value in torch.load(big, weights_only=True).items():
    assert torch.equal(value, tensors[key]) or key == 'uint16', key
  _assert_same(tensors, _read_without_torch([big], tmp_path)[0], torch)


class _Exploit:
  """Pickles as a call of os.mkdir: what a malicious checkpoint would do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def _legacy_file(path, obj):
  with open(path, 'wb') as f:
    for item in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': True}, obj,
                 []):
      pickle.dump(item, f, protocol=2)
  return str(path)


def _zip_file(path, obj):
  with zipfile.ZipFile(path, 'w') as f:
    f.writestr('archive/data.pkl', pickle.dumps(obj, protocol=2))
    f.writestr('archive/byteorder', 'little')
  return str(path)


@pytest.mark.parametrize('write', [_legacy_file, _zip_file])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, write):
  marker = tmp_path / 'created_by_the_pickle'
  path = write(tmp_path / 'evil.pth', {'model': _Exploit(str(marker))})
  with pytest.raises(pth_reader.PthReadError,
                     match=r'refusing to unpickle posix\.mkdir'):
    pth_reader.load(path)
  assert not marker.exists()
  # The same file with plain values only is fine.
  path = write(tmp_path / 'plain.pth', {'iteration': 7, 'lr': [0.1, (1, 2)]})
  assert pth_reader.load(path) == {'iteration': 7, 'lr': [0.1, (1, 2)]}


def test_pickled_module_is_refused(tmp_path):
  torch = pytest.importorskip('torch')
  for fmt in FORMATS:
    path = _save(torch, torch.nn.Linear(2, 2), tmp_path / f'{fmt}.pth', fmt)
    with pytest.raises(pth_reader.PthReadError,
                       match='refusing to unpickle torch.nn.modules.linear.'
                       'Linear.*state_dict'):
      pth_reader.load(path)


def test_not_a_checkpoint_truncated_and_missing_files(tmp_path):
  torch = pytest.importorskip('torch')
  with pytest.raises(FileNotFoundError, match='not found'):
    pth_reader.load(tmp_path / 'missing.pth')
  for name, data in [('garbage.pth', b'not a checkpoint at all'),
                     ('empty.pth', b''),
                     ('plain_pickle.pth', pickle.dumps({'a': 1}, protocol=2))]:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(pth_reader.PthReadError,
                       match='not a PyTorch checkpoint'):
      pth_reader.load(tmp_path / name)
  tensors = {'w': torch.randn(64, 64)}
  for fmt in FORMATS:
    data = open(_save(torch, tensors, tmp_path / f'{fmt}.pth', fmt),
                'rb').read()
    cut = tmp_path / f'cut_{fmt}.pth'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(pth_reader.PthReadError, match='truncated'):
      pth_reader.load(cut)
  with warnings.catch_warnings():  # torch.jit is deprecated, its files exist
    warnings.simplefilter('ignore', DeprecationWarning)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)),
                   str(tmp_path / 'scripted.pt'))
  with pytest.raises(pth_reader.PthReadError, match='TorchScript'):
    pth_reader.load(tmp_path / 'scripted.pt')
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as f:
    f.writestr('readme.txt', 'hello')
  with pytest.raises(pth_reader.PthReadError, match='without a data.pkl'):
    pth_reader.load(tmp_path / 'other.zip')


_LOAD_VGG_WITHOUT_TORCH = '''
import sys
sys.modules['torch'] = None
import numpy as np
from flax import nnx
from ssd_jax import models
from ssd_jax.interop import torch_import
from tests.tiny import tiny_config
config = tiny_config()
config.model.backbone.batch_norm = False
config.model.backbone.pretrained = sys.argv[1]
model = nnx.eval_shape(lambda: models.create_model(config))
# What trainer.train_and_evaluate calls for model.backbone.pretrained.
torch_import.load_pretrained_backbone(
    model, config.model.backbone.pretrained, config)
state_dict = np.load(sys.argv[2])
for conv, key in zip(model.backbone.vgg, torch_import.torch_vgg_indices()):
  np.testing.assert_array_equal(
      np.asarray(conv.kernel[...]),
      state_dict[f'{key}.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(conv.bias[...]),
                                state_dict[f'{key}.bias'])
print('loaded', len(model.backbone.vgg), 'convs')
'''


def test_pretrained_vgg_in_legacy_format_loads_without_torch(tmp_path):
  """The default config's backbone file (vgg16_reducedfc layout, legacy)."""
  torch = pytest.importorskip('torch')
  config = tiny_config()
  config.model.backbone.batch_norm = False
  vgg = {key[len('backbone.vgg.'):]: value
         for key, value in reference_state_dict(config).items()
         if key.startswith('backbone.vgg.')}
  assert len(vgg) == 30 and '33.bias' in vgg
  # Saved as transposed (strided) views, like a model's OIHW -> HWIO would be.
  def strided(value):
    if value.ndim < 4:
      return torch.from_numpy(value)
    return torch.from_numpy(value.transpose(1, 0, 2, 3).copy()).transpose(0, 1)
  state_dict = collections.OrderedDict(
      (key, strided(value)) for key, value in vgg.items())
  path = _save(torch, state_dict, tmp_path / 'vgg16_reducedfc.pth', 'legacy')
  np.savez(tmp_path / 'vgg.npz', **vgg)
  out = _run_without_torch(_LOAD_VGG_WITHOUT_TORCH, path,
                           str(tmp_path / 'vgg.npz'))
  assert 'loaded 15 convs' in out
