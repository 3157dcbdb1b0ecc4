"""Reads PyTorch `.pth` files into numpy, without PyTorch.

`load(path)` returns the saved object with every tensor as a numpy array
(C-contiguous copies; bfloat16 and float8 as ml_dtypes types) and everything
else as plain Python values. Two on-disk formats:

  zip (torch.save since 1.6): `<archive>/data.pkl` is the pickled object,
      `<archive>/data/<key>` the raw bytes of storage <key>, `<archive>/
      byteorder` 'little' or 'big' (absent = little);
  legacy (`_use_new_zipfile_serialization=False`, and torch < 1.6): one stream
      of pickles: magic number, protocol version, sys info, the object, the
      sorted list of storage keys; then per key an int64 element count and
      the storage's raw bytes, always little-endian.

In both, a tensor pickles as `_rebuild_tensor_v2(storage, offset, size,
stride, ...)` (offset and stride in elements) and a storage as the persistent
id ('storage', storage type, key, location, numel[, view]).

The unpickler is restricted: it resolves only the globals in `_GLOBALS`
(tensor and parameter rebuild functions, storage types, torch dtypes,
OrderedDict and a few builtins), so reading a file never runs code from it;
anything else raises PthReadError('refusing to unpickle module.name').
"""

import collections
import io
import os
import pickle
import struct
import typing
import zipfile
import zlib

import ml_dtypes
import numpy as np


class PthReadError(ValueError):
  """The file is not a PyTorch checkpoint this reader can (or may) read."""


# Storage classes of the pickle -> element dtype.
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,  # bytes; _rebuild_tensor_v3 names the dtype
}

# torch.<dtype> globals (pickled dtypes, e.g. the dtype of _rebuild_tensor_v3).
_TORCH_DTYPES = {
    'float64': np.float64, 'double': np.float64,
    'float32': np.float32, 'float': np.float32,
    'float16': np.float16, 'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'int64': np.int64, 'long': np.int64,
    'int32': np.int32, 'int': np.int32,
    'int16': np.int16, 'short': np.int16,
    'int8': np.int8, 'uint8': np.uint8,
    'uint16': np.uint16, 'uint32': np.uint32, 'uint64': np.uint64,
    'bool': np.bool_,
    'complex64': np.complex64, 'cfloat': np.complex64,
    'complex128': np.complex128, 'cdouble': np.complex128,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn,
    'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz,
    'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
}

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class _StorageType(typing.NamedTuple):
  """What a `torch.<X>Storage` global unpickles to."""
  name: str
  dtype: np.dtype


class _TorchDType(typing.NamedTuple):
  """What a `torch.<dtype>` global unpickles to."""
  name: str
  dtype: np.dtype


class _TensorType(typing.NamedTuple):
  """What `torch.Tensor` / `torch.nn.Parameter` unpickle to."""
  name: str


class _StorageRef(typing.NamedTuple):
  """A storage of the file: `numel` elements of `dtype` from `start` on."""
  key: str
  dtype: np.dtype
  start: int
  numel: int


class _PendingTensor(typing.NamedTuple):
  """A tensor whose storage bytes are read after unpickling."""
  storage: _StorageRef
  dtype: np.dtype
  offset: int
  size: tuple
  stride: tuple
  metadata: typing.Any


def _check_ints(name, values, ndim=None):
  if (not isinstance(values, (tuple, list)) or
      not all(isinstance(v, int) and v >= 0 for v in values) or
      (ndim is not None and len(values) != ndim)):
    raise PthReadError(f'tensor {name} {values!r} is not a tuple of '
                       f'{ndim if ndim is not None else ""} non-negative ints')
  return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None,
                    metadata=None):
  if not isinstance(storage, _StorageRef):
    raise PthReadError(f'a tensor refers to {type(storage).__name__}, '
                       'not to a storage')
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise PthReadError(f'tensor storage offset {storage_offset!r} is not a '
                       'non-negative int')
  size = _check_ints('size', size)
  stride = _check_ints('stride', stride, len(size))
  dtype = storage.dtype if dtype is None else dtype
  return _PendingTensor(storage, np.dtype(dtype), storage_offset, size, stride,
                        metadata)


def _rebuild_tensor_v1(storage, storage_offset, size, stride):
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  del requires_grad, backward_hooks
  return _rebuild_tensor(storage, storage_offset, size, stride,
                         metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  del requires_grad, backward_hooks
  if not isinstance(dtype, _TorchDType):
    raise PthReadError(f'_rebuild_tensor_v3: {dtype!r} is not a torch dtype')
  return _rebuild_tensor(storage, storage_offset, size, stride, dtype.dtype,
                         metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  """A Parameter is read as its data (requires_grad and state are dropped)."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, _PendingTensor):
    raise PthReadError(f'a Parameter holds {type(data).__name__}, '
                       'not a tensor')
  return data


_REBUILD_FUNCTIONS = (_rebuild_tensor_v1, _rebuild_tensor_v2,
                      _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  """A Tensor or Parameter pickled with Python attributes (dropped)."""
  del state
  if func not in _REBUILD_FUNCTIONS or not isinstance(new_type, _TensorType):
    raise PthReadError(f'_rebuild_from_type_v2 of {new_type!r} is only '
                       'supported for plain tensors and parameters')
  if not isinstance(args, tuple):
    raise PthReadError('_rebuild_from_type_v2: arguments are not a tuple')
  return func(*args)


def _codecs_encode(text, encoding='utf-8'):
  """How protocol-2 pickles of Python 3 write bytes objects."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise PthReadError(f'_codecs.encode({type(text).__name__}, {encoding!r}) '
                       'is not a pickled bytes object')
  return text.encode('latin1')


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'Counter'): collections.Counter,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('_codecs', 'encode'): _codecs_encode,
    ('torch', 'Size'): tuple,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor_v1,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch.tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _TensorType('Tensor'),
    ('torch._tensor', 'Tensor'): _TensorType('Tensor'),
    ('torch.nn.parameter', 'Parameter'): _TensorType('Parameter'),
}
for _module in ('torch', 'torch.cuda', 'torch.storage'):
  for _name, _dtype in _STORAGE_DTYPES.items():
    _GLOBALS[(_module, _name)] = _StorageType(_name, np.dtype(_dtype))
for _name, _dtype in _TORCH_DTYPES.items():
  _GLOBALS[('torch', _name)] = _TorchDType(_name, np.dtype(_dtype))


def allowed_globals():
  """The sorted 'module.name' globals the unpickler resolves."""
  return sorted(f'{m}.{n}' for m, n in _GLOBALS)


class _Unpickler(pickle.Unpickler):
  """Resolves only `_GLOBALS`; storages become `_StorageRef`s."""

  def __init__(self, file, legacy):
    super().__init__(file, encoding='utf-8')
    self._legacy = legacy
    self.storages = {}  # key -> _StorageRef of the whole storage

  def find_class(self, module, name):
    try:
      return _GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise PthReadError(
          f'refusing to unpickle {module}.{name}: only tensors, storages, '
          'OrderedDict and plain Python values are read without PyTorch (a '
          'pickled Module or custom class? Save its state_dict() instead)'
      ) from None

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or not pid or
        pid[0] not in ('storage', b'storage')):
      raise PthReadError(f'unknown persistent id {str(pid)[:80]!r} '
                         '(expected a tensor storage)')
    fields = pid[1:]
    if len(fields) != (5 if self._legacy else 4):
      raise PthReadError(f'malformed storage id {pid!r}')
    storage_type, key, _, numel = fields[:4]
    view = fields[4] if self._legacy else None
    if not isinstance(storage_type, _StorageType):
      raise PthReadError(f'storage type {storage_type!r} is not a storage')
    key = key.decode() if isinstance(key, bytes) else str(key)
    if not isinstance(numel, int) or numel < 0:
      raise PthReadError(f'storage {key}: bad element count {numel!r}')
    root = self.storages.setdefault(
        key, _StorageRef(key, storage_type.dtype, 0, numel))
    if view is None:
      return root._replace(dtype=storage_type.dtype, numel=numel)
    # Storage views of torch < 0.4: (view key, element offset, numel).
    _, offset, view_numel = view
    if not (isinstance(offset, int) and isinstance(view_numel, int) and
            0 <= offset and 0 <= view_numel):
      raise PthReadError(f'storage {key}: malformed view {view!r}')
    return _StorageRef(key, storage_type.dtype, offset, view_numel)


class _Bytes:
  """Raw storage bytes by key, viewed as typed element arrays on demand."""

  def __init__(self, byteorder):
    self.byteorder = byteorder
    self.raw = {}  # key -> 1-D uint8 array
    self._typed = {}

  def typed(self, key, dtype, source):
    if (key, dtype) not in self._typed:
      if key not in self.raw:
        raise PthReadError(f'{source}: storage {key} has no data')
      raw = self.raw[key]
      data = raw[:len(raw) - len(raw) % dtype.itemsize].view(dtype)
      if self.byteorder != 'little' and dtype.itemsize > 1:
        data = data.byteswap()
      self._typed[(key, dtype)] = data
    return self._typed[(key, dtype)]


def _materialize(obj, storage_bytes, source):
  """Replaces every _PendingTensor/_StorageRef in `obj` by a numpy array."""
  done = {}

  def tensor(t):
    elements = storage_bytes.typed(t.storage.key, t.dtype, source)
    # A _rebuild_tensor_v3 storage is untyped: its start and numel count bytes.
    scale = t.storage.dtype.itemsize / t.dtype.itemsize
    start = int(t.storage.start * scale)
    available = min(int(t.storage.numel * scale), len(elements) - start)
    if 0 in t.size:
      return np.zeros(t.size, t.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= available:
      raise PthReadError(
          f'{source}: a tensor of size {t.size}, stride {t.stride} at offset '
          f'{t.offset} needs {last + 1} elements but its storage '
          f'{t.storage.key} holds {available} (truncated or corrupt file)')
    base = elements[start + t.offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=t.size, strides=[s * t.dtype.itemsize for s in t.stride],
        writeable=False)
    array = np.array(view, order='C')
    metadata = t.metadata or {}
    if metadata.get('conj'):
      array = np.conj(array)
    if metadata.get('neg'):
      array = np.negative(array)
    return array

  def walk(x):
    if isinstance(x, _PendingTensor):
      if id(x) not in done:
        done[id(x)] = tensor(x)
      return done[id(x)]
    if isinstance(x, _StorageRef):
      elements = storage_bytes.typed(x.key, x.dtype, source)
      return np.array(elements[x.start:x.start + x.numel])
    if isinstance(x, _TorchDType):
      return x.dtype
    if isinstance(x, (dict, list)):
      if id(x) in done:
        return x
      done[id(x)] = x
      for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
        x[k] = walk(v)
      return x
    if isinstance(x, tuple) and type(x) is tuple:
      return tuple(walk(v) for v in x)
    return x

  return walk(obj)


def _zip_archive_prefix(archive, path):
  names = archive.namelist()
  if any(n.endswith('/constants.pkl') for n in names):
    raise PthReadError(
        f'{path} is a TorchScript archive (torch.jit.save); only files of '
        'torch.save can be read: save the model\'s state_dict() instead')
  pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if not pickles:
    raise PthReadError(f'{path} is a zip archive without a data.pkl record: '
                       'not a file written by torch.save')
  return pickles[0][:-len('data.pkl')]


def _load_zip(path):
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise PthReadError(
        f'{path}: truncated or corrupt zip archive ({e}); download or save '
        'the checkpoint again') from e
  with archive:
    prefix = _zip_archive_prefix(archive, path)
    names = set(archive.namelist())
    try:
      byteorder = 'little'
      if prefix + 'byteorder' in names:
        byteorder = archive.read(prefix + 'byteorder').decode('ascii').strip()
      if byteorder not in ('little', 'big'):
        raise PthReadError(f'{path}: unknown byte order {byteorder!r}')
      unpickler = _Unpickler(io.BytesIO(archive.read(prefix + 'data.pkl')),
                             legacy=False)
      obj = unpickler.load()
      storage_bytes = _Bytes(byteorder)
      for key, ref in unpickler.storages.items():
        name = f'{prefix}data/{key}'
        if name not in names:
          raise PthReadError(f'{path}: storage record {name} is missing')
        storage_bytes.raw[key] = np.frombuffer(archive.read(name), np.uint8)
    except PthReadError:
      raise
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
      raise PthReadError(
          f'{path}: truncated or corrupt zip archive ({e})') from e
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError,
            AttributeError) as e:
      raise PthReadError(f'{path}: corrupt data.pkl ({type(e).__name__}: '
                         f'{e})') from e
  return _materialize(obj, storage_bytes, path)


def _load_legacy(path):
  with open(path, 'rb') as f:
    try:
      magic = _Unpickler(f, legacy=True).load()
      if magic != _LEGACY_MAGIC_NUMBER:
        raise PthReadError(f'{path}: not a PyTorch checkpoint (bad magic '
                           'number)')
      version = _Unpickler(f, legacy=True).load()
      if version != _LEGACY_PROTOCOL_VERSION:
        raise PthReadError(f'{path}: unsupported legacy PyTorch protocol '
                           f'version {version!r}')
      _Unpickler(f, legacy=True).load()  # sys info; data is little-endian
      unpickler = _Unpickler(f, legacy=True)
      obj = unpickler.load()
      keys = _Unpickler(f, legacy=True).load()
      if not isinstance(keys, list):
        raise PthReadError(f'{path}: corrupt storage key list')
      storage_bytes = _Bytes('little')
      for key in keys:
        key = str(key)
        if key not in unpickler.storages:
          raise PthReadError(f'{path}: storage {key} is not used by the object')
        header = f.read(8)
        if len(header) < 8:
          raise EOFError(f'storage {key} is missing')
        numel, = struct.unpack('<q', header)
        nbytes = numel * unpickler.storages[key].dtype.itemsize
        data = f.read(nbytes)
        if len(data) < nbytes:
          raise EOFError(f'storage {key} has {len(data)} of {nbytes} bytes')
        storage_bytes.raw[key] = np.frombuffer(data, np.uint8)
    except PthReadError:
      raise
    except EOFError as e:
      raise PthReadError(f'{path}: truncated legacy PyTorch file ({e}); '
                         'download or save it again') from e
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError,
            AttributeError, struct.error) as e:
      raise PthReadError(f'{path}: corrupt legacy PyTorch file '
                         f'({type(e).__name__}: {e})') from e
  return _materialize(obj, storage_bytes, path)


def load(path):
  """The object saved by `torch.save` at `path`, tensors as numpy arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    PthReadError: not a torch.save file, truncated or corrupt, or it pickles
      something other than tensors and plain values.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'PyTorch checkpoint not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(512)
  if head.startswith(b'PK'):
    return _load_zip(path)
  if len(head) > 12 and head[0] == 0x80 and head[2:4] == b'\x8a\x0a':
    return _load_legacy(path)
  if head[257:262] == b'ustar':
    raise PthReadError(f'{path}: the tar format of torch < 0.4 is not '
                       'supported; load and re-save it with torch.save')
  raise PthReadError(f'{path}: not a PyTorch checkpoint (neither a torch.save '
                     'zip archive nor a legacy torch.save pickle)')
