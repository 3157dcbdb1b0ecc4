"""Tests of ssd_jax.data.augment against the reference's operations.

The reference chain is re-run here step by step with numpy and OpenCV (what
the reference uses), from the random decisions our code drew, and compared
with our windowed, canvas-free implementation.
"""

import io

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from ssd_jax.data import augment

cv2 = pytest.importorskip('cv2')

MEAN = np.array([123, 117, 104], np.float32)
S = 300


def _encode(image, image_format):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, image_format, quality=95)
  return buf.getvalue()


def _smooth_image(height, width, seed):
  rng = np.random.RandomState(seed)
  base = cv2.resize(rng.rand(6, 8, 3).astype(np.float32) * 255,
                    (width, height))
  return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _padded(boxes, labels, m=8):
  b = np.zeros([m, 4], np.float32)
  l = np.zeros([m], np.int32)
  b[:len(boxes)] = boxes
  l[:len(labels)] = labels
  return b, l, np.arange(m) < len(boxes)


def _reference_photometric(image, p):
  """PhotometricDistort with given decisions, with OpenCV as the reference."""
  x = (image.astype(np.float32) + p['delta']) * p['alpha_before']
  hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
  hsv[..., 1] *= p['saturation']
  hsv[..., 0] += p['hue']
  hsv[..., 0][hsv[..., 0] > 360.0] -= 360.0
  hsv[..., 0][hsv[..., 0] < 0.0] += 360.0
  x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * p['alpha_after']
  return x[..., p['permutation']]


def _reference_chain(image, boxes, labels, geo, params):
  """The reference's train transform replayed with our decisions (numpy)."""
  height, width = image.shape[:2]
  x = _reference_photometric(image, params)
  top, left, canvas_h, canvas_w = (int(v) for v in geo['canvas'])
  canvas = np.empty([canvas_h, canvas_w, 3], np.float32)
  canvas[:] = MEAN
  canvas[top:top + height, left:left + width] = x
  boxes = boxes + np.array([left, top, left, top], np.float32)
  x0, y0, x1, y1 = (int(v) for v in geo['crop'])
  crop = canvas[y0:y1, x0:x1]
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  cropped = (x0, y0, x1, y1) != (0, 0, canvas_w, canvas_h)
  if cropped:
    keep = ((x0 < centres[:, 0]) & (y0 < centres[:, 1]) &
            (x1 > centres[:, 0]) & (y1 > centres[:, 1]))
    boxes, labels = boxes[keep], labels[keep]
    boxes[:, :2] = np.maximum(boxes[:, :2], [x0, y0]) - [x0, y0]
    boxes[:, 2:] = np.minimum(boxes[:, 2:], [x1, y1]) - [x0, y0]
  crop_h, crop_w = crop.shape[:2]
  if geo['mirror']:
    crop = crop[:, ::-1]
    boxes = boxes.copy()
    boxes[:, 0::2] = crop_w - boxes[:, 2::-2]
  boxes = boxes / np.array([crop_w, crop_h, crop_w, crop_h], np.float32)
  # Before the reference's SubtractMeans, which the train step does.
  out = cv2.resize(np.ascontiguousarray(crop), (S, S))
  return out, boxes, labels


def _run(image_bytes, is_jpeg, size, boxes, labels, seed):
  b, l, mask = _padded(boxes, labels)
  seed = tf.constant(seed, tf.int64)
  u = augment.draw_uniforms(seed)
  geo = {k: v.numpy() for k, v in
         augment.geometry(u, b, mask, size[0], size[1]).items()}
  params = {k: v.numpy() for k, v in augment.photometric_params(u).items()}
  out = augment.train_transform(
      tf.constant(image_bytes), tf.constant(is_jpeg), tf.constant(size), b, l,
      mask, seed, image_size=S, pixel_mean=MEAN)
  return {k: v.numpy() for k, v in out.items()}, geo, params


def test_hsv_conversions_match_opencv():
  rng = np.random.RandomState(0)
  rgb = (rng.rand(64, 80, 3) * 400 - 60).astype(np.float32)  # out of range too
  hsv = augment.rgb_to_hsv(tf.constant(rgb)).numpy()
  want = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
  np.testing.assert_allclose(hsv, want, rtol=1e-5, atol=1e-3)
  want_hsv = want.copy()
  want_hsv[..., 1] *= 1.4  # saturation above 1, as the reference allows
  np.testing.assert_allclose(
      augment.hsv_to_rgb(tf.constant(want_hsv)).numpy(),
      cv2.cvtColor(want_hsv, cv2.COLOR_HSV2RGB), rtol=1e-5, atol=1e-3)


def test_photometric_distort_matches_reference_ops():
  image = _smooth_image(40, 50, 1)
  for s in range(24):
    u = augment.draw_uniforms(tf.constant([3, s], tf.int64))
    params = augment.photometric_params(u)
    ours = augment.photometric_distort(tf.constant(image, tf.float32), params)
    want = _reference_photometric(image,
                                  {k: v.numpy() for k, v in params.items()})
    np.testing.assert_allclose(ours.numpy(), want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize('image_format', ['PNG', 'JPEG'])
def test_train_transform_equals_the_reference_chain(image_format):
  height, width = 90, 120
  image = _smooth_image(height, width, 2)
  data = _encode(image, image_format)
  decoded = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  boxes = np.array([[10, 15, 50, 60], [60, 5, 115, 85], [0, 0, 119, 89],
                    [30, 40, 31, 70]], np.float32)
  labels = np.array([3, 7, 1, 2], np.int32)
  cropped = mirrored = expanded = 0
  for s in range(40):
    out, geo, params = _run(data, image_format == 'JPEG', [height, width],
                            boxes, labels, [9, s])
    want_image, want_boxes, want_labels = _reference_chain(
        decoded, boxes, labels, geo, params)
    np.testing.assert_allclose(out['image'], want_image, atol=0.02)
    k = len(want_labels)
    assert out['mask'].tolist() == [True] * k + [False] * (8 - k)
    np.testing.assert_allclose(out['boxes'][:k], want_boxes, atol=1e-6)
    np.testing.assert_array_equal(out['labels'][:k], want_labels)
    assert not out['boxes'][k:].any() and not out['labels'][k:].any()
    cropped += tuple(geo['crop']) != (0, 0, geo['canvas'][3], geo['canvas'][2])
    mirrored += geo['mirror']
    expanded += geo['canvas'][2] != height
  assert min(cropped, mirrored, expanded) >= 8  # every branch was exercised


def test_box_invariants():
  height, width = 60, 80
  data = _encode(_smooth_image(height, width, 3), 'PNG')
  rng = np.random.RandomState(4)
  for s in range(30):
    xy = rng.uniform(0, [width - 2, height - 2], size=(5, 2))
    wh = rng.uniform(1, [width, height], size=(5, 2))
    boxes = np.concatenate(
        [xy, np.minimum(xy + wh, [width - 1, height - 1])], 1)
    out, _, _ = _run(data, False, [height, width], boxes.astype(np.float32),
                     np.arange(1, 6, dtype=np.int32), [1, s])
    mask = out['mask']
    k = mask.sum()
    assert mask.tolist() == [True] * k + [False] * (8 - k)
    valid = out['boxes'][mask]
    assert np.all(valid >= 0) and np.all(valid <= 1)
    assert np.all(valid[:, 2:] > valid[:, :2])
    assert np.all(out['labels'][mask] > 0) and not out['labels'][~mask].any()
    assert not out['boxes'][~mask].any()
    assert out['image'].shape == (S, S, 3)


def _crop(u_modes, u_trials, boxes, height=100.0, width=100.0):
  b, _, mask = _padded(np.asarray(boxes, np.float32), [1] * len(boxes))
  rect, keep = augment.sample_crop(
      tf.constant(u_modes, tf.float32), tf.constant(u_trials, tf.float32), b,
      mask, tf.constant(height), tf.constant(width))
  return rect.numpy(), keep.numpy()[:len(boxes)]


def _iou(boxes, rect):
  boxes = np.asarray(boxes, np.float64)
  iw = np.clip(np.minimum(boxes[:, 2], rect[2]) -
               np.maximum(boxes[:, 0], rect[0]), 0, None)
  ih = np.clip(np.minimum(boxes[:, 3], rect[3]) -
               np.maximum(boxes[:, 1], rect[1]), 0, None)
  inter = iw * ih
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / (area + (rect[2] - rect[0]) * (rect[3] - rect[1]) - inter)


def test_crop_iou_and_centre_rules():
  d, t = augment.CROP_MODE_DRAWS, augment.CROP_TRIALS
  rng = np.random.RandomState(5)
  boxes = [[10, 10, 60, 70], [40, 30, 95, 90], [70, 5, 80, 20], [3, 4, 97, 95]]
  centres = (np.array(boxes)[:, :2] + np.array(boxes)[:, 2:]) / 2
  for mode, min_iou in ((1, 0.1), (2, 0.3), (3, 0.7), (4, 0.9), (5, -1)):
    crops = 0
    for _ in range(20):
      u_modes = np.full([d], (mode + 0.5) / 6)
      rect, keep = _crop(u_modes, rng.rand(d, t, 4), boxes)
      if tuple(rect) == (0, 0, 100, 100):
        continue
      crops += 1
      assert rect.tolist() == np.floor(rect).tolist()
      assert 0.5 <= (rect[3] - rect[1]) / (rect[2] - rect[0]) <= 2.5
      assert _iou(boxes, rect).max() >= min_iou
      inside = ((rect[0] < centres[:, 0]) & (centres[:, 0] < rect[2]) &
                (rect[1] < centres[:, 1]) & (centres[:, 1] < rect[3]))
      assert keep.tolist() == inside.tolist() and keep.any()
    assert crops >= 5, mode


def test_crop_mode_none_and_bounded_retry():
  d, t = augment.CROP_MODE_DRAWS, augment.CROP_TRIALS
  rng = np.random.RandomState(6)
  boxes = [[10, 10, 12, 12]]  # tiny: IoU >= 0.3 with a crop is impossible
  # Every mode draw asks for IoU 0.9: all 50 x 16 trials fail, no crop.
  rect, keep = _crop(np.full([d], 4.5 / 6), rng.rand(d, t, 4), boxes)
  assert rect.tolist() == [0, 0, 100, 100] and keep.tolist() == [True]
  # The first draw that is None (mode 0) stops the search uncropped, even if
  # later draws could crop.
  u_modes = np.full([d], 5.5 / 6)
  u_modes[0] = 0.5 / 6
  rect, keep = _crop(u_modes, rng.rand(d, t, 4), boxes)
  assert rect.tolist() == [0, 0, 100, 100]
  # No boxes: never cropped.
  rect, _ = _crop(np.full([d], 5.5 / 6), rng.rand(d, t, 4), np.zeros([0, 4]))
  assert rect.tolist() == [0, 0, 100, 100]


def test_crop_offset_covers_zero():
  """Our fix: left ~ U(0, W - w); the reference never starts at 0."""
  d, t = augment.CROP_MODE_DRAWS, augment.CROP_TRIALS
  u_trials = np.full([d, t, 4], 0.5)
  u_trials[..., 2:] = 0.0  # left = top = 0
  rect, _ = _crop(np.full([d], 5.5 / 6), u_trials, [[10, 10, 60, 60]])
  assert rect[:2].tolist() == [0, 0]
  assert rect[2:].tolist() == [65, 65]  # int(0.3 W + 0.7 W * 0.5)


def test_expanded_and_cropped_boxes_stay_on_their_pixels():
  """White rectangles on black: each output box must still cover white."""
  height, width = 100, 140
  boxes = np.array([[10, 20, 49, 59], [80, 10, 129, 39], [60, 60, 119, 94]],
                   np.float32)
  image = np.zeros([height, width, 3], np.uint8)
  for x1, y1, x2, y2 in boxes.astype(int):
    image[y1:y2 + 1, x1:x2 + 1] = 255
  data = _encode(image, 'PNG')
  checked = 0
  for s in range(40):
    out, geo, _ = _run(data, False, [height, width], boxes,
                       np.array([1, 2, 3], np.int32), [5, s])
    # Gray stays gray under the photometric ops; the canvas is the mean.
    x = out['image']
    gray = np.ptp(x, axis=-1) < 1e-3
    for box in out['boxes'][out['mask']] * S:
      x1, y1, x2, y2 = box
      if min(x2 - x1, y2 - y1) < 8:
        continue
      rows = slice(int(np.ceil(y1 + 2)), int(y2 - 2))
      cols = slice(int(np.ceil(x1 + 2)), int(x2 - 2))
      inner, inner_gray = x[rows, cols], gray[rows, cols]
      assert inner_gray.all() and inner.min() > 100, (s, box)
      checked += 1
    # Outside all boxes nothing is white. (VOC boxes name the last pixel, so
    # the white ends one source pixel after xmax and ymax.)
    crop_h, crop_w = geo['crop_hw']
    pixel_x, pixel_y = S / crop_w, S / crop_h
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    near = np.zeros([S, S], bool)
    for x1, y1, x2, y2 in out['boxes'][out['mask']] * S:
      if geo['mirror']:  # the extra pixel is on the left after mirroring
        x1 -= pixel_x
      else:
        x2 += pixel_x
      near |= ((xx > x1 - 2) & (xx < x2 + 2) & (yy > y1 - 2) &
               (yy < y2 + pixel_y + 2))
    white = gray & (x[..., 0] > 100)
    # (A box dropped by the crop may leave white pixels; only check when
    # every box survived.)
    if out['mask'].sum() == 3:
      assert not (white & ~near).any(), s
  assert checked >= 40


def test_eager_equals_tf_data():
  height, width = 50, 70
  data = _encode(_smooth_image(height, width, 7), 'JPEG')
  boxes = np.array([[5, 5, 40, 30], [20, 10, 69, 49]], np.float32)
  b, l, mask = _padded(boxes, [1, 2])

  def transform(seed):
    return augment.train_transform(
        tf.constant(data), tf.constant(True), tf.constant([height, width]), b,
        l, mask, tf.stack([tf.constant(2, tf.int64), seed]), image_size=S,
        pixel_mean=MEAN)

  seeds = list(range(6))
  eager = [transform(tf.constant(s, tf.int64)) for s in seeds]
  ds = tf.data.Dataset.from_tensor_slices(np.array(seeds, np.int64))
  ds = ds.map(transform, num_parallel_calls=2, deterministic=True)
  for want, got in zip(eager, ds.as_numpy_iterator()):
    for key in want:
      np.testing.assert_array_equal(want[key].numpy(), got[key], err_msg=key)


@pytest.mark.parametrize('mode,image_format,tolerance,options', [
    ('RGB', 'JPEG', 0, {}), ('RGB', 'JPEG', 0, {'progressive': True}),
    ('L', 'JPEG', 0, {}), ('CMYK', 'JPEG', 8, {}), ('RGB', 'PNG', 0, {}),
    ('P', 'PNG', 0, {}), ('RGBA', 'PNG', 0, {})])
def test_decoding_matches_pil_rgb(mode, image_format, tolerance, options):
  """Our decode equals the reference's PIL `.convert('RGB')`."""
  image = Image.fromarray(_smooth_image(40, 56, 8)).convert(mode)
  buf = io.BytesIO()
  image.save(buf, image_format, **options)
  data = buf.getvalue()
  want = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.int32)
  got = augment.decode_image(tf.constant(data),
                             tf.constant(image_format == 'JPEG')).numpy()
  assert np.abs(got.astype(np.int32) - want).max() <= tolerance
  window = augment.decode_window(
      tf.constant(data), tf.constant(image_format == 'JPEG'),
      tf.constant([40, 56]), tf.constant([5, 7, 20, 30])).numpy()
  np.testing.assert_array_equal(window, got[5:25, 7:37])
