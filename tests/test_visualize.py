"""Drawing detections: box outlines and filled label tags in the class colour."""

import numpy as np

from ssd_jax.deploy import visualize

NAMES = ['background', 'circle', 'square']


def _draw(score_threshold=0.3):
  image = np.full((200, 300, 3), 128, np.uint8)
  boxes = np.array([[50, 60, 150, 160], [200, 10, 290, 190]], np.float32)
  return image, visualize.draw_detections(
      image, boxes, np.array([1, 2]), np.array([0.9, 0.2]), NAMES,
      score_threshold=score_threshold)


def test_box_outline_and_filled_tag_above_it_in_the_class_colour():
  image, drawn = _draw()
  colour = visualize._PALETTE[0]  # pylint: disable=protected-access
  assert drawn.shape == image.shape and drawn.dtype == np.uint8
  np.testing.assert_array_equal(drawn[100, 50], colour)   # left edge
  np.testing.assert_array_equal(drawn[160, 100], colour)  # bottom edge
  # The tag sits above the box (y < 60, a 10-px font here) and is mostly the class colour, with
  # contrasting text pixels in it.
  tag = drawn[48:59, 52:70].reshape(-1, 3)
  is_colour = np.all(tag == colour, axis=1)
  assert 0.4 < is_colour.mean() < 1.0
  np.testing.assert_array_equal(drawn[100, 100], image[100, 100])  # inside


def test_detections_below_the_threshold_are_not_drawn():
  image, drawn = _draw()
  np.testing.assert_array_equal(drawn[:, 195:], image[:, 195:])
  _, all_drawn = _draw(score_threshold=0.1)
  assert not np.array_equal(all_drawn[:, 195:], image[:, 195:])


def test_label_text_contrasts_with_its_tag():
  assert visualize._text_color((255, 225, 25)) == (0, 0, 0)  # pylint: disable=protected-access
  assert visualize._text_color((0, 0, 128)) == (255, 255, 255)  # pylint: disable=protected-access
