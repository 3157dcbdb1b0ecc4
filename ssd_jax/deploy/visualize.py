"""Drawing detections on images: demo.py, TensorBoard and the video demo.

Each box gets its class colour and a label (class name and score) on a filled
tag of that colour, with text and line widths sized to the image, so the
label reads on any background.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)], np.uint8)


def _text_color(color):
  """Black or white, whichever contrasts with `color` (sRGB luma)."""
  luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: one fixed bitmap size
    return ImageFont.load_default()


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
  short_side = min(canvas.size)
  line_width = max(1, round(short_side / 150))
  font = _font(max(10, round(short_side / 22)))
  for box, label, score in zip(boxes, labels, scores):
    if score < score_threshold:
      continue
    color = tuple(int(c) for c in _PALETTE[(int(label) - 1) % len(_PALETTE)])
    x0, y0, x1, y1 = (float(v) for v in box)
    draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)
    name = class_names[int(label)] if int(label) < len(class_names) else label
    text = f'{name} {score:.2f}'
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tag_w, tag_h = right - left + 4, bottom - top + 4
    # Above the box where there is room, else just inside its top edge.
    tag_y = y0 - tag_h if y0 - tag_h >= 0 else y0
    tag_x = min(max(x0, 0), max(canvas.size[0] - tag_w, 0))
    draw.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=color)
    draw.text((tag_x + 2 - left, tag_y + 2 - top), text, font=font,
              fill=_text_color(color))
  return np.asarray(canvas)
