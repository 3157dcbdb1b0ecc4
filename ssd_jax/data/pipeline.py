"""Train and eval input pipelines: what the trainer and the evaluator call.

    it = create_train_iterator(config, start_step=0)
    batch = next(it)        # numpy dict, global step start_step + 0
    logging.info(it.stats.summary())

    for batch in create_eval_iterator(config, 'voc_2007_test', batch_size=10):
      ...

The train stream is a pure function of (config.seed, step): the examples of
step s are positions s*B .. s*B+B-1 of an endless sequence made of one seeded
permutation of the dataset per epoch, and an example's augmentation is seeded
by (config.seed, its position). A run resumed at step s builds the index
permutations and starts at position s*B, decoding nothing before it, and sees
exactly the batches an uninterrupted run would have seen. Each host takes its
own contiguous slice of every global batch.

Bad input never stops a run. Examples whose image or annotation is unusable
are left out when the index is built (sources.py, coco.py). An image that
still fails to decode inside tf.data is replaced, in its own batch, by an
empty example (a mean-grey image with no boxes, which adds nothing to the
loss; in eval, valid=False), so every batch keeps its step's examples. Both
pipelines do this the same way (`_render_group`, `_missing_examples`) and
count each failing image once as a 'decode_error' skip in `iterator.stats`.

Images leave the pipeline as RGB pixel values, not mean-subtracted; the
train and predict steps subtract input.pixel_mean on the device
(predict_lib.normalize_images). Eval images are uint8, exactly the reference's
(its resize yields uint8): a quarter of float32's bytes. Train images are
the augmentation's float32 values, which the photometric distortion takes
beyond 0..255; input.train_image_dtype='uint8' sends them rounded and
saturated instead, 4x fewer bytes but other values (README "Input
pipeline").

Every parallel stage takes its width from the host: tf.data.AUTOTUNE (the
cores this process may use), unless data.num_parallel_calls fixes it.
"""

import collections
import functools
import threading

import jax
import numpy as np
import tensorflow as tf

from ssd_jax.data import augment
from ssd_jax.data import coco
from ssd_jax.data import records
from ssd_jax.data import sources

# The graph functions below have no Python control flow on tensors (their
# loops and branches are over Python values), so AutoGraph's rewriting of
# their source, about 2 s per train iterator (measured 2.7 s -> 0.9 s), is
# skipped.
_no_autograph = tf.autograph.experimental.do_not_convert


class DataStats:
  """Counts of skipped examples and fixed annotations of one iterator.

  Index-time counts come from building the index; decode failures inside
  tf.data are added as batches arrive (each failing image counted once).
  """

  def __init__(self, index_counts):
    self._counts = records.Counts().merge(index_counts)
    self._failed = set()
    self._lock = threading.Lock()

  def add_decode_failures(self, examples):
    """Counts the examples (indices into the index) that failed, once each."""
    with self._lock:
      new = set(examples) - self._failed
      self._failed |= new
      self._counts.skipped['decode_error'] += len(new)

  @property
  def counts(self):
    return self._counts

  def summary(self):
    """`skipped N of M examples (reason: count, ...)[; fixed (...)]`."""
    with self._lock:
      return self._counts.summary()


@functools.lru_cache(maxsize=8)
def _cached_index(voc_root, coco_root, tfds_data_dir, class_names,
                  dataset_name, training):
  if coco.is_coco_dataset(dataset_name):
    return coco.coco_index(coco_root, tfds_data_dir, dataset_name,
                           training=training)
  return sources.voc_index(voc_root, tfds_data_dir, dataset_name, class_names)


def load_index(config, dataset_name, *, training=False):
  """The index of one dataset, from the backend the config picks (cached).

  Args:
    config: uses `data.voc_root` ('' = TFDS), `data.coco_root` (COCO
      datasets, '' = TFDS), `data.tfds_data_dir`, `data.class_names` (VOC;
      a COCO dataset's names come from its categories),
      `model.num_classes` (checked against a COCO dataset's categories).
    dataset_name: e.g. 'voc_2007_trainval', 'coco_2014_minival'.
    training: COCO only: leave out images without annotations and keep no
      ground truth for COCOeval (see data/coco.py).

  Returns:
    A records.Index.

  Raises:
    records.DatasetNotFoundError: the dataset is not there (the message says
      how to get it).
    ValueError: a COCO dataset whose number of categories does not match
      config.model.num_classes.
  """
  is_coco = coco.is_coco_dataset(dataset_name)
  index = _cached_index(
      config.data.voc_root, config.data.get('coco_root', ''),
      config.data.tfds_data_dir,
      () if is_coco else tuple(config.data.class_names), dataset_name,
      training and is_coco)
  if is_coco:
    coco.check_num_classes(index.coco, config.model.num_classes, dataset_name)
  return index


def num_examples(config, dataset_name):
  """Number of usable examples of `dataset_name` (after skipping bad ones)."""
  return len(load_index(config, dataset_name))


class DatasetError(ValueError):
  """A dataset of the config cannot be used; the message says how to fix it."""


def check_datasets(config, dataset_names=None):
  """Opens and indexes every dataset before any step runs.

  Args:
    config: uses data.{train, test, voc_root, tfds_data_dir, class_names,
      skip_unknown_classes}, model.num_classes.
    dataset_names: the datasets to check (default: data.train + data.test).

  Returns:
    {dataset name: records.Counts} of the indices built.

  Raises:
    DatasetError: listing every problem found, each with its dataset and its
      fix: model.num_classes that does not fit data.class_names (VOC-format
      datasets) or a COCO annotation file's categories, a missing
      folder, split or TFDS dataset, a split without usable examples, object
      classes missing from data.class_names (unless
      data.skip_unknown_classes).
  """
  if dataset_names is None:
    dataset_names = tuple(config.data.train) + tuple(config.data.test)
  train_names = set(config.data.train)
  class_names = tuple(config.data.class_names)
  problems = []
  # COCO datasets take their class names from their annotation file (and
  # load_index checks num_classes against it); the others use
  # data.class_names.
  uses_class_names = False
  counts = {}
  for name in dict.fromkeys(dataset_names):
    try:
      index = load_index(config, name, training=name in train_names)
    except (records.DatasetNotFoundError, ValueError) as e:
      problems.append(f'dataset {name!r}: {e}')
      continue
    uses_class_names |= index.coco is None
    counts[name] = index.counts
    if not len(index):
      problems.append(
          f'dataset {name!r} has no usable example '
          f'({index.counts.summary()}): check its split file and that its '
          'images and annotations are where the split file says.')
    unknown = index.counts.unknown_classes
    if unknown and not config.data.get('skip_unknown_classes', False):
      listing = ', '.join(f'{n!r}: {c}' for n, c in sorted(unknown.items()))
      problems.append(
          f'dataset {name!r} has objects of classes not in data.class_names '
          f'({listing}): add them to data.class_names (and '
          'model.num_classes), or pass '
          '--config.data.skip_unknown_classes=True to drop them.')
  if uses_class_names and config.model.num_classes != len(class_names):
    problems.insert(0,
        f'model.num_classes is {config.model.num_classes} but '
        f'data.class_names has {len(class_names)} names (background '
        'included): make them agree, e.g. '
        f'--config.model.num_classes={len(class_names)}.')
  if problems:
    raise DatasetError('Cannot use the datasets of this config:\n  ' +
                       '\n  '.join(problems))
  return counts


def _per_host_batch(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by the '
                     f'number of processes {process_count}')
  return batch_size // process_count


def _num_parallel_calls(config):
  n = config.data.num_parallel_calls
  return tf.data.AUTOTUNE if n is None or n < 0 else n


def train_image_dtype(config):
  """tf dtype of the train images: input.train_image_dtype (float32)."""
  name = config.input.get('train_image_dtype', 'float32')
  if name not in ('uint8', 'float32'):
    raise ValueError("config.input.train_image_dtype must be 'uint8' or "
                     f"'float32', got {name!r}")
  return tf.as_dtype(name)


def mean_grey_image(image_size, pixel_mean, dtype):
  """The `image_size` x `image_size` image of the mean colour (0 after mean
  subtraction), in `dtype` (uint8 rounds the mean)."""
  mean = tf.constant(pixel_mean, tf.float32)
  if dtype == tf.uint8:
    mean = tf.cast(tf.clip_by_value(tf.round(mean), 0.0, 255.0), tf.uint8)
  return tf.tile(mean[None, None], [image_size, image_size, 1])


def _render_group(group, render, filler, num_parallel_calls):
  """A dataset of `render` over the elements of `group`, failures replaced.

  tf.data cannot catch an op error inside a map function, so the elements on
  which `render` raises (an image that does not decode) are dropped and the
  group is topped up with `filler`s to its own size: a group (a train step,
  an eval batch) keeps its examples together whatever fails.
  `_missing_examples` then tells, on the host, which examples were replaced.

  Args:
    group: dict of tensors with a leading dimension g, one row per element.
    render: element dict -> output dict.
    filler: output dict standing in for a failed element; its 'example' is
      -1.
    num_parallel_calls: width of the render map.

  Returns:
    A dataset of g output dicts: the rendered elements in order, then the
    fillers.
  """
  size = tf.shape(group['example'], out_type=tf.int64)[0]
  rendered = tf.data.Dataset.from_tensor_slices(group).map(
      _no_autograph(render), num_parallel_calls=num_parallel_calls,
      deterministic=True).ignore_errors()
  fillers = tf.data.Dataset.from_tensors(filler).repeat(size)
  return rendered.concatenate(fillers).take(size)


def _missing_examples(expected, rendered):
  """The examples of a group that `_render_group` replaced by fillers.

  Args:
    expected: int [g] the group's example indices.
    rendered: int [g] the 'example' of its output rows (-1 for fillers).

  Returns:
    collections.Counter {example: times replaced}.
  """
  missing = collections.Counter(expected.tolist())
  missing.subtract(rendered.tolist())
  return +missing


# ------------------------------------------------------------------- train ---


class _TrainIndex:
  """The training view of an index: the boxes the augmentation sees.

  Difficult and zero-area boxes are dropped and at most max_boxes kept per
  image (the first ones), as counted in `counts`.

  Attributes:
    boxes: float32 [K, 4] pixel boxes; labels: int32 [K]; row_splits: int64
      [N + 1] (the boxes of example i are rows row_splits[i]:row_splits[i+1]);
      counts: records.Counts.
  """

  def __init__(self, index, max_boxes):
    counts = records.Counts().merge(index.counts)
    rows, num = [], []
    for i in range(len(index)):
      boxes, _, difficult = index.objects(i)
      zero = ((boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1]))
      counts.fixed['box_zero_area'] += int((zero & ~difficult).sum())
      keep = np.flatnonzero(~difficult & ~zero)
      if len(keep) > max_boxes:
        counts.fixed['too_many_boxes'] += 1
        keep = keep[:max_boxes]
      if not len(keep):
        counts.fixed['no_objects'] += 1
      rows.append(index.row_splits[i] + keep)
      num.append(len(keep))
    rows = np.concatenate(rows).astype(np.int64)
    self.boxes = index.boxes[rows].reshape(-1, 4)
    self.labels = index.labels[rows]
    self.row_splits = np.concatenate([[0], np.cumsum(num)]).astype(np.int64)
    self.counts = counts


def step_examples(seed, step, *, global_batch, host_offset, batch, n):
  """Positions and example indices of one host's share of one step.

  The stream is one stateless permutation of the n examples per epoch,
  epoch e seeded by (seed, -1 - e) (examples' augmentation seeds are
  (seed, position >= 0), so the two never share a key); step s takes
  positions s*B .. s*B+B-1 of it (B = global_batch) and this host the
  `batch` positions from host_offset.

  Returns:
    (positions, examples), int64 [batch] each.
  """
  positions = (tf.cast(step, tf.int64) * global_batch + host_offset +
               tf.range(batch, dtype=tf.int64))
  epochs, offsets = positions // n, positions % n
  unique, which = tf.unique(epochs)
  perms = tf.map_fn(
      lambda e: tf.random.experimental.stateless_shuffle(
          tf.range(n, dtype=tf.int64), tf.stack([seed, -1 - e])),
      unique, fn_output_signature=tf.TensorSpec([n], tf.int64))
  examples = tf.gather_nd(perms, tf.stack(
      [tf.cast(which, tf.int64), offsets], axis=1))
  return positions, examples


class TrainIterator:
  """Endless iterator of this host's training batches (numpy dicts).

  The k-th batch is global step start_step + k. Keys: `image` float32 (or
  input.train_image_dtype) [b, S, S, 3] RGB pixel values, not
  mean-subtracted, `boxes` float32 [b, M, 4] corner form
  in [0, 1], `labels` int32 [b, M] (0 = padding), `mask` bool [b, M], with
  b = solver.batch_size // process_count, S = input.image_size,
  M = data.max_boxes. `stats` counts skipped examples and fixes.
  """

  def __init__(self, config, *, start_step=0, process_index=None,
               process_count=None):
    process_index = (jax.process_index() if process_index is None else
                     process_index)
    process_count = (jax.process_count() if process_count is None else
                     process_count)
    self._global_batch = config.solver.batch_size
    self._batch = _per_host_batch(self._global_batch, process_count)
    self._host_offset = process_index * self._batch
    self._seed = int(config.seed)
    self.step = start_step
    index = records.Index.concatenate(
        [load_index(config, name, training=True)
         for name in config.data.train])
    if not len(index):
      raise ValueError(f'no usable training examples in {config.data.train}: '
                       f'{index.counts.summary()}')
    self._index = index
    self._train = _TrainIndex(index, config.data.max_boxes)
    self.stats = DataStats(self._train.counts)
    self._dataset = self._build(config, start_step)
    self._iterator = iter(self._dataset.as_numpy_iterator())

  def _build(self, config, start_step):
    """The tf.data pipeline of this host's batches from `start_step` on."""
    b = self._batch
    graph = _TrainGraph(self._index, self._train, config,
                        seed=self._seed, global_batch=self._global_batch,
                        host_offset=self._host_offset, batch=b)
    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    ds = ds.map(_no_autograph(graph.step_inputs))
    ds = ds.map(_no_autograph(graph.step_geometry),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Every step yields exactly b examples (block_length), so the output
    # order does not depend on how many steps tf.data renders at once.
    ds = ds.interleave(_no_autograph(graph.step_images),
                       cycle_length=tf.data.AUTOTUNE, block_length=b,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(config.data.prefetch or tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    self.step += 1
    examples = batch.pop('example')
    expected = batch.pop('step_examples')[0]
    self.stats.add_decode_failures(_missing_examples(expected, examples))
    return batch


class _TrainGraph:
  """The TF functions of the train pipeline, one per stage of a step.

  A step goes: its step number -> `step_inputs` (which examples, their padded
  boxes) -> `step_geometry` (augmentation draws and box geometry for the
  whole step) -> `step_images` (a dataset of its b rendered examples, failed
  decodes replaced by `empty_example`).
  """

  def __init__(self, index, train_index, config, *, seed, global_batch,
               host_offset, batch):
    self._batch = batch
    self._max_boxes = config.data.max_boxes
    self._image_size = config.input.image_size
    self._pixel_mean = tuple(float(v) for v in config.input.pixel_mean)
    self._image_dtype = train_image_dtype(config)
    self._num_parallel_calls = _num_parallel_calls(config)
    self._read = records.image_reader(index)
    self._seed = tf.constant(seed, tf.int64)
    self._boxes = tf.RaggedTensor.from_row_splits(train_index.boxes,
                                                  train_index.row_splits)
    self._labels = tf.RaggedTensor.from_row_splits(train_index.labels,
                                                   train_index.row_splits)
    self._sizes = tf.constant(index.sizes)
    self._is_jpeg = tf.constant(index.is_jpeg)
    self._step_examples = functools.partial(
        step_examples, self._seed, global_batch=global_batch,
        host_offset=host_offset, batch=batch, n=len(index))

  def step_inputs(self, step):
    """Step number -> the step's examples and their boxes.

    Returns:
      (positions int64 [b], examples int64 [b], boxes float32 [b, M, 4]
      pixel corner boxes, labels int32 [b, M], mask bool [b, M], sizes int32
      [b, 2] (height, width), is_jpeg bool [b]).
    """
    b, m = self._batch, self._max_boxes
    positions, examples = self._step_examples(step)
    boxes = tf.gather(self._boxes, examples)
    labels = tf.gather(self._labels, examples)
    mask = tf.sequence_mask(boxes.row_lengths(), m)
    return (positions, examples, boxes.to_tensor(shape=[b, m, 4]),
            labels.to_tensor(shape=[b, m]), mask,
            tf.gather(self._sizes, examples),
            tf.gather(self._is_jpeg, examples))

  def step_geometry(self, positions, examples, boxes, labels, mask, sizes,
                    is_jpeg):
    """The augmentation's draws and geometry of one step (`step_inputs`).

    Returns:
      dict of [b, ...] tensors: `example`, `u` (the scalar draws), `size`,
      `is_jpeg`, `labels` and `augment.geometry_batch`'s keys (`boxes` in
      [0, 1] of the crop, `mask`, `order`, the crop window, ...).
    """
    seed = self._seed
    u = tf.map_fn(lambda g: augment.draw_uniforms(tf.stack([seed, g])),
                  positions, fn_output_signature=tf.TensorSpec(
                      [augment.NUM_UNIFORMS], tf.float32))
    geo = augment.geometry_batch(u, boxes, mask, sizes)
    labels = tf.where(geo['mask'],
                      tf.gather(labels, geo['order'], batch_dims=1), 0)
    return {'example': examples, 'u': u[:, :augment.NUM_SCALARS],
            'size': sizes, 'is_jpeg': is_jpeg, 'labels': labels, **geo}

  def render_example(self, x):
    """One example of `step_geometry`'s output -> its train example."""
    image = augment.render_example(
        self._read(x['example']), x['is_jpeg'], x['size'], x, x['u'],
        image_size=self._image_size, pixel_mean=self._pixel_mean,
        dtype=self._image_dtype)
    return {'image': image, 'boxes': x['boxes'], 'labels': x['labels'],
            'mask': x['mask'], 'example': x['example'],
            'step_examples': x['step_examples']}

  def empty_example(self, step_examples):
    """What stands in for an example that failed to decode: mean grey, no
    boxes, example -1."""
    m = self._max_boxes
    return {'image': mean_grey_image(self._image_size, self._pixel_mean,
                                     self._image_dtype),
            'boxes': tf.zeros([m, 4], tf.float32),
            'labels': tf.zeros([m], tf.int32),
            'mask': tf.zeros([m], tf.bool),
            'example': tf.constant(-1, tf.int64),
            'step_examples': step_examples}

  def step_images(self, x):
    """`step_geometry`'s output -> a dataset of the step's b examples.

    Each example also carries the step's example list (`step_examples`), so
    the host can tell which ones `_render_group` replaced.
    """
    x = dict(x, step_examples=tf.tile(x['example'][None], [self._batch, 1]))
    return _render_group(x, self.render_example,
                         self.empty_example(x['example']),
                         self._num_parallel_calls)


def create_train_iterator(config, *, start_step=0):
  """This host's endless stream of training batches; see TrainIterator.

  Args:
    config: uses data.{train, voc_root, tfds_data_dir, class_names,
      max_boxes, num_parallel_calls, prefetch}, input.{image_size,
      pixel_mean, train_image_dtype}, solver.batch_size, seed.
    start_step: global step of the first batch (for resuming).

  Returns:
    A TrainIterator: `next(it)` gives a dict of numpy arrays; `it.stats`
    has the skip/fix counts (`it.stats.summary()` is the log line).
  """
  return TrainIterator(config, start_step=start_step)


# -------------------------------------------------------------------- eval ---


class EvalIterable:
  """This host's share of a dataset for evaluation, padded to full batches.

  Every image of the dataset is in exactly one host's share; every host
  yields the same number of batches (ceil(ceil(N / hosts) / b)). Keys:
  `image` uint8 [b, S, S, 3] RGB (the reference's test transform before its
  mean subtraction, which the predict step does), `image_id` [b] str,
  `orig_size` int32 [b, 2] (height, width), `boxes` float32 [b, Mx, 4] all
  ground truth in original-image pixels (0-based, as the reference parses
  VOC), `labels` int32 [b, Mx], `difficult` bool [b, Mx], `mask` bool
  [b, Mx], `valid` bool [b] (False for padding images and images that
  failed to decode). Mx = the dataset's largest object count (at least 1):
  ground truth is never truncated. COCO datasets: `image_id` is the COCO
  image id (as a string), boxes follow data/coco.py (crowd boxes left out),
  and `.coco` holds the category ids and COCOeval's ground truth.
  """

  def __init__(self, config, dataset_name, *, batch_size, process_index=None,
               process_count=None):
    process_index = (jax.process_index() if process_index is None else
                     process_index)
    process_count = (jax.process_count() if process_count is None else
                     process_count)
    self._batch = _per_host_batch(batch_size, process_count)
    index = load_index(config, dataset_name)
    self._index = index
    # COCO: label -> category ids and the ground truth (coco.CocoInfo).
    self.coco = index.coco
    self.class_names = (index.coco.class_names if index.coco is not None
                        else tuple(config.data.class_names))
    self.stats = DataStats(index.counts)
    self.max_objects = max(index.max_objects, 1)
    self._examples = np.arange(process_index, len(index), process_count)
    per_host = -(-len(index) // process_count)
    self.num_batches = -(-per_host // self._batch)
    self._image_size = config.input.image_size
    self._num_parallel_calls = _num_parallel_calls(config)

  def __len__(self):
    return self.num_batches

  def _dataset(self):
    """Batches of {'image', 'example' (-1: failed), 'batch_examples'}."""
    index = self._index
    read = records.image_reader(index)
    is_jpeg = tf.constant(index.is_jpeg)
    image_size = self._image_size

    def load(x):
      image = augment.eval_transform(read(x['example']),
                                     is_jpeg[x['example']],
                                     image_size=image_size)
      return {'image': image, 'example': x['example'],
              'batch_examples': x['batch_examples']}

    def batch_images(examples):
      group = {'example': examples,
               'batch_examples': tf.tile(examples[None],
                                         [tf.size(examples), 1])}
      empty = {'image': tf.zeros([image_size, image_size, 3], tf.uint8),
               'example': tf.constant(-1, tf.int64),
               'batch_examples': examples}
      return _render_group(group, load, empty, self._num_parallel_calls)

    ds = tf.data.Dataset.from_tensor_slices(self._examples).batch(self._batch)
    # Every batch yields its own number of images (block_length), so the
    # batches below are the ones above.
    ds = ds.interleave(_no_autograph(batch_images),
                       cycle_length=tf.data.AUTOTUNE, block_length=self._batch,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(self._batch).prefetch(tf.data.AUTOTUNE)

  def _ground_truth(self, examples):
    b, m = len(examples), self.max_objects
    boxes = np.zeros([b, m, 4], np.float32)
    labels = np.zeros([b, m], np.int32)
    difficult = np.zeros([b, m], bool)
    mask = np.zeros([b, m], bool)
    for row, example in enumerate(examples):
      bx, lb, df = self._index.objects(example)
      k = len(lb)
      boxes[row, :k], labels[row, :k], difficult[row, :k] = bx, lb, df
      mask[row, :k] = True
    return boxes, labels, difficult, mask

  def __iter__(self):
    emitted = 0
    for batch in self._dataset().as_numpy_iterator():
      yield self._finish(batch)
      emitted += 1
    for _ in range(emitted, self.num_batches):  # hosts with fewer images
      yield self._finish({
          'image': np.zeros([0, self._image_size, self._image_size, 3],
                            np.uint8),
          'example': np.zeros([0], np.int64),
          'batch_examples': np.zeros([0, 0], np.int64)})

  def _in_batch_order(self, batch):
    """(images, examples, failed) with each image at its example's row.

    `_render_group` puts the fillers of failed images last; here they go
    back to the rows of the examples they replace (zero images).
    """
    rendered = batch['example']
    if not len(rendered):
      return batch['image'], rendered, np.zeros(0, bool)
    examples = batch['batch_examples'][0]
    failed = np.isin(examples, list(_missing_examples(examples, rendered)))
    images = np.zeros_like(batch['image'])
    images[~failed] = batch['image'][rendered >= 0]
    return images, examples, failed

  def _finish(self, batch):
    images, examples, failed = self._in_batch_order(batch)
    if failed.any():
      self.stats.add_decode_failures(examples[failed].tolist())
    n, b = len(examples), self._batch
    boxes, labels, difficult, mask = self._ground_truth(examples)
    out = {
        'image': images,
        'image_id': self._index.image_ids[examples],
        'orig_size': self._index.sizes[examples],
        'boxes': boxes, 'labels': labels, 'difficult': difficult,
        'mask': mask, 'valid': ~failed,
    }
    if n < b:  # pad the last batch
      out = {k: np.concatenate([v, np.zeros((b - n,) + v.shape[1:], v.dtype)])
             for k, v in out.items()}
    return out


def create_eval_iterator(config, dataset_name, *, batch_size,
                         process_index=None, process_count=None):
  """This host's evaluation batches of `dataset_name`; see EvalIterable.

  Args:
    config: uses data.{voc_root, tfds_data_dir, class_names,
      num_parallel_calls}, input.image_size.
    dataset_name: e.g. 'voc_2007_test'.
    batch_size: global batch size (split over processes like training).
    process_index, process_count: default to jax's.

  Returns:
    An EvalIterable (re-iterable, `len()` = number of batches, `.stats`).
  """
  return EvalIterable(config, dataset_name, batch_size=batch_size,
                      process_index=process_index,
                      process_count=process_count)
