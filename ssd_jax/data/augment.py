"""The reference's SSD train augmentation, as TF graph ops for tf.data.

The reference (lufficc/SSD `build_transforms(is_train=True)`) runs, in order:
ConvertFromInts, PhotometricDistort, Expand, RandomSampleCrop, RandomMirror,
ToPercentCoords, Resize, SubtractMeans, dropping boxes with x1 == x2 or
y1 == y2 after every step. This module keeps its distributions (crop modes,
trial counts, the IoU and box-centre rules, no clipping in the photometric
ops) with these deliberate changes:

* the crop offset is uniform in [0, W - w] x [0, H - h]: the reference calls
  `numpy.random.uniform(W - w)` with one argument, which draws from
  [1, W - w], a bug rather than a design;
* the crop's retry loop is bounded, since a TF graph cannot loop forever:
  `CROP_MODE_DRAWS` mode draws of `CROP_TRIALS` trials each, then the image
  is left uncropped (which is what the "None" mode does anyway);
* images with more than `max_boxes` objects keep the first `max_boxes` before
  augmenting (batches have static shapes);
* the resize is TF's bilinear (half-pixel centres, no antialiasing), which
  is what the reference's cv2 INTER_LINEAR computes up to rounding.

How it runs. All random numbers come from one stateless draw per example
(`draw_uniforms`), so an example's augmentation is a pure function of its
seed. The geometry (expand canvas, crop rectangle, mirror, box coordinates) is
computed from the boxes alone (`geometry`). Then only the part of the image
the crop sees (the "window") is decoded, and `render` applies the photometric
distortion to the window's pixels and resamples them straight into the
S x S output, mirrored if drawn, with the expand canvas (the mean colour, zero
after mean subtraction) supplied by zero weights instead of a materialised
canvas. Per-pixel operations commute with cropping and the canvas is never
distorted in the reference either, so the output equals the reference chain's
before its SubtractMeans (done by the train step, on the device) up to float
rounding (tests/test_data_augment.py checks this against OpenCV).

Conventions: images are RGB; `geometry` works in pixel coordinates of the
decoded image ((xmin, ymin, xmax, ymax), as the VOC parser gives them) and
returns boxes normalised to [0, 1] of the final crop.
"""

import functools

import numpy as np
import tensorflow as tf

from ssd_jax import data as data_lib

data_lib.hide_gpus_from_tensorflow()

CROP_MODE_DRAWS = 16  # bounded version of the reference's endless mode loop
CROP_TRIALS = 50  # trials per mode, as the reference
# RandomSampleCrop modes, in the reference's order: None = no crop, a number =
# the minimum IoU one box must reach with the crop, -inf = unconstrained.
CROP_MIN_IOU = (np.nan, 0.1, 0.3, 0.7, 0.9, -np.inf)
# Uniform numbers per example: 16 scalars, then the crop's mode draws, then
# 4 per crop trial.
NUM_SCALARS = 16
NUM_UNIFORMS = NUM_SCALARS + CROP_MODE_DRAWS * (1 + 4 * CROP_TRIALS)
# RandomLightingNoise permutations, in the reference's order.
CHANNEL_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                        (2, 1, 0))
_FLT_EPSILON = np.float32(np.finfo(np.float32).eps)
# Window pixel counts are padded up to one of these sizes (2 per octave), so
# the XLA-compiled `render` is compiled for a few shapes only (about 1 s
# each; 9 cover every window of a 500 x 500 image).
_PIXEL_BUCKETS = np.unique(
    (16384 * 2 ** (np.arange(48) / 2) // 1024 * 1024).astype(np.int64))
# Decode this many extra pixels around a JPEG window: libjpeg-turbo's
# cropped decode differs from a full decode at the crop's edge columns
# (chroma upsampling), not beyond one MCU (16 px) inside.
_JPEG_CROP_MARGIN = 16


def draw_uniforms(seed):
  """All random numbers of one example: float32 [NUM_UNIFORMS] in [0, 1).

  Args:
    seed: int [2] tensor; a stateless seed (e.g. (config.seed, global example
      position)).
  """
  return tf.random.stateless_uniform([NUM_UNIFORMS], seed, dtype=tf.float32)


# ------------------------------------------------------------- photometric ---


def rgb_to_hsv(rgb):
  """OpenCV's float RGB->HSV (cv2.COLOR_RGB2HSV), with no range checks.

  Args:
    rgb: float32 [..., 3], any values (the reference does not clip).

  Returns:
    float32 [..., 3]: H in degrees [0, 360), S = (V - min) / |V| (above 1 or
    huge for negative inputs, as OpenCV computes it), V = max(R, G, B).
  """
  r, g, b = tf.unstack(rgb, axis=-1)
  return tf.stack(_rgb_to_hsv(r, g, b), axis=-1)


def hsv_to_rgb(hsv):
  """OpenCV's float HSV->RGB (cv2.COLOR_HSV2RGB): [..., 3] -> [..., 3]."""
  h, s, v = tf.unstack(hsv, axis=-1)
  return tf.stack(_hsv_to_rgb(h, s, v), axis=-1)


def _rgb_to_hsv(r, g, b):
  v = tf.maximum(tf.maximum(r, g), b)
  vmin = tf.minimum(tf.minimum(r, g), b)
  diff = v - vmin
  s = diff / (tf.abs(v) + _FLT_EPSILON)
  k = 60.0 / (diff + _FLT_EPSILON)
  h = tf.where(v == r, (g - b) * k,
               tf.where(v == g, (b - r) * k + 120.0, (r - g) * k + 240.0))
  h = tf.where(h < 0, h + 360.0, h)
  return h, s, v


def _hsv_to_rgb(h, s, v):
  h = h * np.float32(6.0 / 360.0)
  h = tf.where(h >= 6.0, h - 6.0, h)
  h = tf.where(h < 0.0, h + 6.0, h)
  sector = tf.floor(h)
  f = h - sector
  tab = (v, v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)))
  is_sector = [sector == k for k in range(6)]

  def pick(order):  # OpenCV's sector table: tab index for sectors 0..5
    out = tab[order[0]]
    for k in range(1, 6):
      if order[k] != order[0]:
        out = tf.where(is_sector[k], tab[order[k]], out)
    return out

  return pick((0, 2, 1, 1, 3, 0)), pick((3, 0, 0, 2, 1, 1)), pick(
      (1, 1, 3, 0, 0, 2))


def photometric_params(u):
  """The PhotometricDistort decisions from the scalar uniforms.

  Args:
    u: float32 [>= NUM_SCALARS] uniforms (see draw_uniforms).

  Returns:
    dict of scalars: `delta` (brightness, 0 if not drawn), `alpha_before` /
    `alpha_after` (contrast factor applied before / after the HSV block, 1
    where not drawn), `saturation` (1 if not drawn), `hue` (degrees, 0 if not
    drawn), `permutation` (int32 [3], the identity if not drawn).
  """
  on = lambda i: u[i] < 0.5
  contrast = tf.where(on(3), 0.5 + u[4], 1.0)
  contrast_first = on(2)  # the reference's sequence A
  perm_index = tf.minimum(tf.cast(u[10] * 6, tf.int32), 5)
  perm = tf.gather(tf.constant(CHANNEL_PERMUTATIONS, tf.int32), perm_index)
  return {
      'delta': tf.where(on(0), -32.0 + 64.0 * u[1], 0.0),
      'alpha_before': tf.where(contrast_first, contrast, 1.0),
      'alpha_after': tf.where(contrast_first, 1.0, contrast),
      'saturation': tf.where(on(5), 0.5 + u[6], 1.0),
      'hue': tf.where(on(7), -18.0 + 36.0 * u[8], 0.0),
      'permutation': tf.where(on(9), perm, tf.constant([0, 1, 2])),
  }


def photometric_distort(rgb, params):
  """The reference's PhotometricDistort with given decisions; no clipping.

  RandomBrightness, then RandomContrast before (sequence A) or after
  (sequence B) the RGB->HSV, RandomSaturation, RandomHue, HSV->RGB block,
  then RandomLightingNoise (a channel permutation). The HSV round trip always
  runs, as in the reference: it is not the identity for pixels whose
  channels are all negative.

  Args:
    rgb: float32 [..., 3] RGB on the 0..255 scale.
    params: from `photometric_params`.

  Returns:
    float32 [..., 3].
  """
  x = (rgb + params['delta']) * params['alpha_before']
  h, s, v = _rgb_to_hsv(*tf.unstack(x, axis=-1))
  s = s * params['saturation']
  h = h + params['hue']
  h = tf.where(h > 360.0, h - 360.0, h)
  h = tf.where(h < 0.0, h + 360.0, h)
  # Contrast after HSV->RGB scales R, G, B; HSV->RGB is linear in V.
  out = tf.stack(_hsv_to_rgb(h, s, v * params['alpha_after']), axis=-1)
  # (A gather, not a select per channel: XLA then keeps `out` in memory
  # instead of recomputing it for each use, several times faster.)
  return tf.gather(out, params['permutation'], axis=-1)


# ---------------------------------------------------------------- geometry ---


def box_iou_with_rects(boxes, rects):
  """IoU of every box with every rectangle, without the VOC "+1".

  Not box_ops.iou: this runs inside the tf.data graph, which box_ops
  (numpy / jax.numpy) cannot join; the arithmetic is the reference crop's
  (no eps, areas unclipped), equal to box_ops.iou(eps=0) for valid boxes.

  Args:
    boxes: [n, 4] corner form.
    rects: [..., 4] corner form.

  Returns:
    [..., n] intersection / (area_box + area_rect - intersection).
  """
  r = rects[..., None, :]
  iw = tf.maximum(tf.minimum(boxes[:, 2], r[..., 2]) -
                  tf.maximum(boxes[:, 0], r[..., 0]), 0.0)
  ih = tf.maximum(tf.minimum(boxes[:, 3], r[..., 3]) -
                  tf.maximum(boxes[:, 1], r[..., 1]), 0.0)
  inter = iw * ih
  area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  area_r = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
  return inter / (area_b + area_r - inter)


def sample_crop(u_modes, u_trials, boxes, mask, height, width):
  """RandomSampleCrop's choice, with a bounded retry loop.

  Mode draw k picks one of CROP_MIN_IOU uniformly. Mode None means no crop.
  Otherwise its trials draw w ~ U(0.3 W, W), h ~ U(0.3 H, H), and
  (our fix) left ~ U(0, W - w), top ~ U(0, H - h); rect = int(left),
  int(top), int(left + w), int(top + h). A trial is accepted if
  0.5 <= h / w <= 2, some box has IoU >= the mode's minimum with rect, and
  some box centre lies strictly inside rect. The first accepted trial of the
  first mode draw that is None or has one wins; if no draw succeeds (or there
  are no boxes) the image is not cropped.

  Args:
    u_modes: float32 [D] uniforms, one per mode draw.
    u_trials: float32 [D, T, 4] uniforms.
    boxes: float32 [n, 4] pixel corner boxes on the (expanded) image.
    mask: bool [n], False for padding boxes.
    height, width: float32 scalars, size of the (expanded) image.

  Returns:
    rect: float32 [4] (x0, y0, x1, y1) integer-valued, the crop in pixels
      (the whole image when not cropped).
    keep: bool [n], boxes the crop keeps (centre inside; all valid boxes
      when not cropped).
  """
  num_modes = len(CROP_MIN_IOU)
  mode = tf.minimum(tf.cast(u_modes * num_modes, tf.int32), num_modes - 1)
  w = width * (0.3 + 0.7 * u_trials[..., 0])
  h = height * (0.3 + 0.7 * u_trials[..., 1])
  left = u_trials[..., 2] * (width - w)
  top = u_trials[..., 3] * (height - h)
  rects = tf.floor(tf.stack([left, top, left + w, top + h], axis=-1))
  aspect_ok = (h / w >= 0.5) & (h / w <= 2.0)
  nonempty = (rects[..., 2] > rects[..., 0]) & (rects[..., 3] > rects[..., 1])

  iou = tf.where(mask, box_iou_with_rects(boxes, rects), -np.inf)  # [D, T, n]
  min_iou = tf.gather(tf.constant(CROP_MIN_IOU, tf.float32), mode)
  iou_ok = tf.reduce_max(iou, axis=-1) >= min_iou[:, None]
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  inside = ((rects[..., 0:1] < cx) & (rects[..., 1:2] < cy) &
            (rects[..., 2:3] > cx) & (rects[..., 3:4] > cy) & mask)
  accepted = aspect_ok & nonempty & iou_ok & tf.reduce_any(inside, axis=-1)

  resolved = (mode == 0) | tf.reduce_any(accepted, axis=-1)  # [D]
  # tf.gather, not x[i]: XLA needs slice bounds at compile time.
  draw = _first_true(resolved)
  trial = _first_true(tf.gather(accepted, draw))
  crop = (tf.reduce_any(resolved) & (tf.gather(mode, draw) != 0) &
          tf.reduce_any(mask))
  full = tf.stack([0.0, 0.0, width, height])
  rect = tf.where(crop, tf.gather_nd(rects, [draw, trial]), full)
  keep = tf.where(crop, tf.gather_nd(inside, [draw, trial]), mask)
  return rect, keep


def _first_true(flags):
  """Index of the first True in a bool [n] vector (0 if none)."""
  n = tf.shape(flags)[0]
  first = tf.reduce_min(tf.where(flags, tf.range(n), n))
  return tf.where(first < n, first, 0)


def geometry(u, boxes, mask, height, width):
  """Expand, crop and mirror decisions, and the boxes they give.

  Args:
    u: float32 [NUM_UNIFORMS] (draw_uniforms).
    boxes: float32 [M, 4] pixel corner boxes (xmin, ymin, xmax, ymax) on the
      decoded image.
    mask: bool [M], False for padding.
    height, width: int32 scalars, the decoded image size.

  Returns:
    dict:
      `boxes` float32 [M, 4] normalised to the final crop, valid ones first,
        zeros for padding; `mask` bool [M]; `order` int32 [M], the input
        row of each output box (to reorder labels);
      `canvas` float32 [4] (top, left, height, width) of the expand canvas
        relative to the image (0, 0, H, W without expand);
      `crop` float32 [4] (x0, y0, x1, y1) on the canvas; `crop_hw` int32
        [2] its (height, width);
      `mirror` bool;
      `window` int32 [4] (y, x, h, w): the image pixels the crop shows;
      `window_offset` int32 [2] (y, x) of the window inside the crop.
  """
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  # Expand (p = 0.5): ratio ~ U(1, 4), image pasted at int(top), int(left)
  # of an int(H * ratio) x int(W * ratio) canvas filled with the mean.
  expand = u[11] < 0.5
  ratio = 1.0 + 3.0 * u[12]
  canvas_h = tf.where(expand, tf.floor(height * ratio), height)
  canvas_w = tf.where(expand, tf.floor(width * ratio), width)
  left = tf.where(expand, tf.floor(u[13] * (width * ratio - width)), 0.0)
  top = tf.where(expand, tf.floor(u[14] * (height * ratio - height)), 0.0)
  boxes = boxes + tf.stack([left, top, left, top])

  d = CROP_MODE_DRAWS
  u_modes = u[NUM_SCALARS:NUM_SCALARS + d]
  u_trials = tf.reshape(u[NUM_SCALARS + d:], [d, CROP_TRIALS, 4])
  rect, keep = sample_crop(u_modes, u_trials, boxes, mask, canvas_h, canvas_w)
  boxes = tf.concat([tf.maximum(boxes[:, :2], rect[:2]),
                     tf.minimum(boxes[:, 2:], rect[2:])], axis=1)
  boxes = boxes - tf.concat([rect[:2], rect[:2]], axis=0)
  crop_w = rect[2] - rect[0]
  crop_h = rect[3] - rect[1]

  mirror = u[15] < 0.5  # RandomMirror: x1' = W - x2, x2' = W - x1
  boxes = tf.where(mirror, tf.stack([crop_w - boxes[:, 2], boxes[:, 1],
                                     crop_w - boxes[:, 0], boxes[:, 3]],
                                    axis=1), boxes)
  boxes = boxes / tf.stack([crop_w, crop_h, crop_w, crop_h])
  # Compose's rule: boxes with x1 == x2 or y1 == y2 are dropped.
  keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  order = tf.argsort(tf.cast(~keep, tf.int32), stable=True)
  keep = tf.gather(keep, order)
  boxes = tf.where(keep[:, None], tf.gather(boxes, order), 0.0)

  # The image pixels inside the crop, and where they sit in the crop.
  # (Never empty: the crop holds a box centre, or it is the whole canvas;
  # the 1-pixel floor only keeps the decoder safe.)
  wx0 = tf.clip_by_value(rect[0] - left, 0.0, width - 1.0)
  wx1 = tf.clip_by_value(rect[2] - left, wx0 + 1.0, width)
  wy0 = tf.clip_by_value(rect[1] - top, 0.0, height - 1.0)
  wy1 = tf.clip_by_value(rect[3] - top, wy0 + 1.0, height)
  window = tf.cast(tf.stack([wy0, wx0, wy1 - wy0, wx1 - wx0]), tf.int32)
  window_offset = tf.cast(
      tf.stack([wy0 + top - rect[1], wx0 + left - rect[0]]), tf.int32)
  return {
      'boxes': boxes, 'mask': keep, 'order': order,
      'canvas': tf.stack([top, left, canvas_h, canvas_w]),
      'crop': rect, 'crop_hw': tf.cast(tf.stack([crop_h, crop_w]), tf.int32),
      'mirror': mirror, 'window': window, 'window_offset': window_offset,
  }


@tf.function(jit_compile=True, autograph=False)
def geometry_batch(u, boxes, mask, sizes):
  """`geometry` for a batch in one XLA call (a per-example call costs more).

  Args:
    u: float32 [b, NUM_UNIFORMS]; boxes: float32 [b, M, 4]; mask: bool
      [b, M]; sizes: int32 [b, 2] (height, width).

  Returns:
    geometry's dict with a leading batch dimension.
  """
  return tf.map_fn(lambda a: geometry(a[0], a[1], a[2], a[3][0], a[3][1]),
                   (u, boxes, mask, sizes), fn_output_signature=_GEOMETRY_SPEC,
                   parallel_iterations=1)


_GEOMETRY_SPEC = {
    'boxes': tf.TensorSpec(None, tf.float32),
    'mask': tf.TensorSpec(None, tf.bool),
    'order': tf.TensorSpec(None, tf.int32),
    'canvas': tf.TensorSpec([4], tf.float32),
    'crop': tf.TensorSpec([4], tf.float32),
    'crop_hw': tf.TensorSpec([2], tf.int32),
    'mirror': tf.TensorSpec([], tf.bool),
    'window': tf.TensorSpec([4], tf.int32),
    'window_offset': tf.TensorSpec([2], tf.int32),
}


# ------------------------------------------------------------------ pixels ---


def decode_window(image_bytes, is_jpeg, image_hw, window):
  """Decodes the pixels of `window` = (y, x, h, w) as uint8 [h, w, 3] RGB.

  JPEGs decode only the window plus a margin (the margin makes the result
  equal to a full decode); other formats (PNG, GIF, BMP) decode whole.
  Grayscale, CMYK and palette images come out as RGB.

  Args:
    image_bytes: string scalar.
    is_jpeg: bool scalar.
    image_hw: int32 [2], the image size.
    window: int32 [4].
  """
  y, x, h, w = tf.unstack(window)

  def jpeg():
    y0 = tf.maximum(y - _JPEG_CROP_MARGIN, 0)
    x0 = tf.maximum(x - _JPEG_CROP_MARGIN, 0)
    y1 = tf.minimum(y + h + _JPEG_CROP_MARGIN, image_hw[0])
    x1 = tf.minimum(x + w + _JPEG_CROP_MARGIN, image_hw[1])
    image = tf.io.decode_and_crop_jpeg(
        image_bytes, tf.stack([y0, x0, y1 - y0, x1 - x0]), channels=3,
        dct_method='INTEGER_ACCURATE')
    return image[y - y0:y - y0 + h, x - x0:x - x0 + w]

  def other():
    image = tf.io.decode_image(image_bytes, channels=3,
                               expand_animations=False)
    return image[y:y + h, x:x + w]

  image = tf.cond(is_jpeg, jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


def decode_image(image_bytes, is_jpeg):
  """Decodes a whole image as uint8 [H, W, 3] RGB (JPEG as PIL does)."""
  image = tf.cond(
      is_jpeg,
      lambda: tf.io.decode_jpeg(image_bytes, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(image_bytes, channels=3,
                                 expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


def _taps(out_size, crop_size, window_start, window_size, flip):
  """Bilinear taps of a half-pixel resize of one axis of the crop.

  Output i samples crop coordinate (i + 0.5) * crop / out - 0.5, clamped to
  [0, crop - 1] (cv2.resize INTER_LINEAR); mirrored if `flip`. Taps are
  indices into the window; taps outside it (the expand canvas) get weight 0.

  Returns:
    (index_lo, index_hi) int32 [out], (weight_lo, weight_hi) float32 [out].
  """
  crop = tf.cast(crop_size, tf.float32)
  src = (tf.range(out_size, dtype=tf.float32) + 0.5) * (crop / out_size) - 0.5
  src = tf.clip_by_value(src, 0.0, crop - 1.0)
  src = tf.where(flip, crop - 1.0 - src, src)
  lo = tf.floor(src)
  frac = src - lo
  lo = tf.cast(lo, tf.int32)
  hi = tf.minimum(lo + 1, crop_size - 1)
  lo -= window_start
  hi -= window_start
  inside = lambda i: tf.cast((i >= 0) & (i < window_size), tf.float32)
  clamp = lambda i: tf.clip_by_value(i, 0, tf.maximum(window_size - 1, 0))
  return clamp(lo), clamp(hi), (1.0 - frac) * inside(lo), frac * inside(hi)


@functools.cache
def _render_fn(image_size, dtype):
  """The XLA-compiled pixel path for one output size and dtype (`render`)."""

  @tf.function(jit_compile=True, autograph=False, input_signature=[
      tf.TensorSpec([None, 3], tf.uint8),  # window pixels, row-major, padded
      tf.TensorSpec([2], tf.int32),  # window (h, w)
      tf.TensorSpec([2], tf.int32),  # crop (h, w)
      tf.TensorSpec([2], tf.int32),  # window offset in the crop (y, x)
      tf.TensorSpec([], tf.bool),  # mirror
      tf.TensorSpec([NUM_SCALARS], tf.float32),  # the scalar uniforms
      tf.TensorSpec([3], tf.float32),  # pixel mean
  ])
  def render_xla(pixels, window_hw, crop_hw, offset, mirror, u, mean):
    x = photometric_distort(tf.cast(pixels, tf.float32),
                            photometric_params(u))
    x -= mean  # the canvas is the mean: 0 after subtraction, no pixels
    y0, y1, wy0, wy1 = _taps(image_size, crop_hw[0], offset[0], window_hw[0],
                             tf.constant(False))
    x0, x1, wx0, wx1 = _taps(image_size, crop_hw[1], offset[1], window_hw[1],
                             mirror)
    out = 0.0
    for rows, weight_rows in ((y0, wy0), (y1, wy1)):
      for cols, weight_cols in ((x0, wx0), (x1, wx1)):
        values = tf.gather(x, rows[:, None] * window_hw[1] + cols[None, :])
        out += values * (weight_rows[:, None] * weight_cols)[..., None]
    out += mean
    if dtype == tf.uint8:  # round half to even and saturate, as cv2 would
      return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return out

  return render_xla


def render(window_pixels, crop_hw, window_offset, mirror, u, *, image_size,
           pixel_mean, dtype=tf.float32):
  """Photometric distortion, crop, mirror and resize: the pixel values.

  Equals: distort the window's pixels (decisions from `u`), place them at
  `window_offset` in a crop of size `crop_hw` filled with the mean, mirror
  it if `mirror`, resize to image_size x image_size with cv2-style bilinear
  (half-pixel centres, edge clamp, no antialiasing). The mean is not
  subtracted (the train step does that on the device). In float32 the values
  are the reference's, beyond 0..255 where the distortion takes them; uint8
  rounds them (half to even) and saturates them to 0..255, which changes
  them (README "Input pipeline": input.train_image_dtype).

  Args:
    window_pixels: uint8 [h, w, 3] RGB.
    crop_hw: int32 [2].
    window_offset: int32 [2] (y, x).
    mirror: bool scalar.
    u: float32 [>= NUM_SCALARS], the example's uniforms.
    image_size: output side S.
    pixel_mean: 3 floats, RGB.
    dtype: tf.float32 or tf.uint8, the output's.

  Returns:
    [S, S, 3] RGB pixel values in `dtype`.
  """
  window_hw = tf.shape(window_pixels)[:2]
  pixels = tf.reshape(window_pixels, [-1, 3])
  # Pad the pixel count to a bucket: XLA compiles once per input shape.
  n = tf.shape(pixels, out_type=tf.int64)[0]
  buckets = tf.constant(_PIXEL_BUCKETS)
  bucket = tf.gather(buckets, tf.minimum(
      tf.searchsorted(buckets, n[None])[0], len(_PIXEL_BUCKETS) - 1))
  pixels = tf.pad(pixels, [[0, tf.maximum(bucket - n, 0)], [0, 0]])
  if dtype not in (tf.float32, tf.uint8):
    raise ValueError(f'render: dtype must be float32 or uint8, got {dtype}')
  return _render_fn(image_size, tf.as_dtype(dtype))(
      pixels, window_hw, crop_hw, window_offset, mirror, u[:NUM_SCALARS],
      tf.constant(pixel_mean, tf.float32))


def render_example(image_bytes, is_jpeg, image_hw, geo, u, *, image_size,
                   pixel_mean, dtype=tf.float32):
  """The output image of one example: decode its window, then `render`."""
  pixels = decode_window(image_bytes, is_jpeg, image_hw, geo['window'])
  return render(pixels, geo['crop_hw'], geo['window_offset'], geo['mirror'],
                u, image_size=image_size, pixel_mean=pixel_mean, dtype=dtype)


def train_transform(image_bytes, is_jpeg, size, boxes, labels, mask, seed, *,
                    image_size, pixel_mean, dtype=tf.float32):
  """One training example, augmented as the reference does.

  (The input pipeline runs the same steps with `geometry_batch` for a whole
  batch; this is the one-example form.)

  Args:
    image_bytes: string scalar, the encoded image.
    is_jpeg: bool scalar (else PNG/GIF/BMP).
    size: int32 [2] (height, width) of the decoded image.
    boxes: float32 [M, 4] pixel corner boxes (0-based, inside the image).
    labels: int32 [M].
    mask: bool [M], False for padding.
    seed: int [2] stateless seed of this example.
    image_size: output side S.
    pixel_mean: 3 floats, RGB.
    dtype: of the image, see `render`.

  Returns:
    dict: `image` [S, S, 3] RGB pixel values in `dtype` (see `render`; not
    mean-subtracted), `boxes` float32
    [M, 4] in [0, 1] corner form, `labels` int32 [M] (0 = padding), `mask`
    bool [M]; valid boxes first.
  """
  u = draw_uniforms(seed)
  geo = geometry(u, boxes, mask, size[0], size[1])
  image = render_example(image_bytes, is_jpeg, size, geo, u,
                         image_size=image_size, pixel_mean=pixel_mean,
                         dtype=dtype)
  labels = tf.where(geo['mask'], tf.gather(labels, geo['order']), 0)
  return {'image': image, 'boxes': geo['boxes'], 'labels': labels,
          'mask': geo['mask']}


def eval_transform(image_bytes, is_jpeg, *, image_size):
  """The reference's test transform up to its mean subtraction: uint8 [S, S, 3].

  cv2.resize of the uint8 image to S x S (bilinear, half-pixel centres),
  rounded back to uint8 as OpenCV does for uint8 images. The reference then
  converts to float and subtracts the mean, which the predict step does on
  the device (exact: uint8 holds the resized image completely).
  """
  image = decode_image(image_bytes, is_jpeg)
  image = tf.image.resize(image, [image_size, image_size], method='bilinear',
                          antialias=False)
  image = tf.clip_by_value(tf.floor(image + 0.5), 0.0, 255.0)
  return tf.cast(image, tf.uint8)
