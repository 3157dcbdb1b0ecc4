"""Drawing detections on images (for TensorBoard)."""

import numpy as np
from PIL import Image, ImageDraw

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)], np.uint8)


def draw_detections(image, boxes, labels, scores, class_names,
                    score_threshold=0.3):
  """Draws boxes with class name and score onto a copy of `image`.

  Args:
    image: [H, W, 3] uint8 RGB.
    boxes: [K, 4] (xmin, ymin, xmax, ymax) in pixels of `image`.
    labels: [K] int class indices into `class_names`.
    scores: [K] float.
    class_names: names, index 0 = background.
    score_threshold: detections below this score are not drawn.

  Returns:
    [H, W, 3] uint8.
  """
  canvas = Image.fromarray(np.asarray(image, np.uint8))
  draw = ImageDraw.Draw(canvas)
  for box, label, score in zip(boxes, labels, scores):
    if score < score_threshold:
      continue
    color = tuple(int(c) for c in _PALETTE[(int(label) - 1) % len(_PALETTE)])
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    name = class_names[int(label)] if int(label) < len(class_names) else label
    draw.text((x0 + 2, y0 + 1), f'{name} {score:.2f}', fill=color)
  return np.asarray(canvas)
