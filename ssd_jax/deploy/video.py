"""Detections on a video file or camera, drawn into a video, one JSON line
per frame.

OpenCV reads and writes the frames (`pip install opencv-python-headless`);
the Detector runs batches of frames, so a file is read ahead while the
device works. Each JSON line is
  {"frame": index, "time": seconds from the start, "detections":
   [{"box": [x1, y1, x2, y2], "score", "label", "class_name"}, ...]}
with boxes in frame pixels, as demo.py writes for images.
"""

import json
import time

import numpy as np

from ssd_jax.deploy import visualize


class VideoError(ValueError):
  """A video that cannot be opened or holds no frame."""


def _cv2():
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise VideoError('video needs OpenCV: pip install '
                     'opencv-python-headless') from e
  return cv2


def detection_records(result):
  """A Detector result -> the JSON list of demo.py."""
  return [{'box': [round(float(v), 2) for v in box], 'score': float(score),
           'label': int(label), 'class_name': class_name}
          for box, score, label, class_name in zip(
              result['boxes'], result['scores'], result['labels'],
              result['class_names'])]


def open_capture(source):
  """cv2.VideoCapture of a file path (str) or a camera index (int)."""
  cv2 = _cv2()
  capture = cv2.VideoCapture(source)
  if not capture.isOpened():
    what = f'camera {source}' if isinstance(source, int) else source
    raise VideoError(f'cannot open {what} as a video')
  return capture


def _frames(capture):
  """(index, time in seconds, RGB uint8 [H, W, 3]) of each frame."""
  cv2 = _cv2()
  fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
  index = 0
  while True:
    ok, frame = capture.read()
    if not ok:
      return
    seconds = index / fps if fps > 0 else capture.get(
        cv2.CAP_PROP_POS_MSEC) / 1000
    yield index, float(seconds), cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    index += 1


def detect_video(detector, source, output_path, jsonl_path, *,
                 score_threshold=0.5, batch_size=8, max_frames=None,
                 log=print):
  """Runs `detector` over every frame of `source` and writes both outputs.

  Args:
    detector: a deploy.inference.Detector.
    source: a video file path, or an int camera index.
    output_path: the .mp4 written (mp4v codec, the source's frame rate, or
      30 when the source does not say).
    jsonl_path: the JSON-lines file, one line per frame.
    score_threshold: detections above this are kept and drawn.
    batch_size: frames per Detector call (1 for a camera: no latency).
    max_frames: stop after this many frames (None: the whole source).
    log: where the summary line goes.

  Returns:
    {'frames': number of frames, 'seconds': wall time, 'fps': frames per
    second of the whole loop (read, detect, draw, write)}.

  Raises:
    VideoError: the source cannot be opened or yields no frame.
  """
  cv2 = _cv2()
  capture = open_capture(source)
  fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
  writer = None
  frames = 0
  start = time.perf_counter()
  try:
    with open(jsonl_path, 'w') as lines:
      batch = []

      def flush():
        nonlocal writer
        results = detector([frame for _, _, frame in batch],
                           score_threshold=score_threshold)
        for (index, seconds, frame), result in zip(batch, results):
          if writer is None:
            height, width = frame.shape[:2]
            writer = cv2.VideoWriter(
                output_path, cv2.VideoWriter_fourcc(*'mp4v'),
                fps if fps > 0 else 30.0, (width, height))
            if not writer.isOpened():
              raise VideoError(f'cannot write a video to {output_path}')
          drawn = visualize.draw_detections(
              frame, result['boxes'], result['labels'], result['scores'],
              detector.class_names, score_threshold=score_threshold)
          writer.write(cv2.cvtColor(np.ascontiguousarray(drawn),
                                    cv2.COLOR_RGB2BGR))
          lines.write(json.dumps({'frame': index, 'time': round(seconds, 4),
                                  'detections': detection_records(result)})
                      + '\n')
        batch.clear()

      for item in _frames(capture):
        if max_frames is not None and frames >= max_frames:
          break
        batch.append(item)
        frames += 1
        if len(batch) == batch_size:
          flush()
      if batch:
        flush()
  finally:
    capture.release()
    if writer is not None:
      writer.release()
  if frames == 0:
    raise VideoError(f'no frame could be read from {source}')
  seconds = time.perf_counter() - start
  summary = {'frames': frames, 'seconds': seconds, 'fps': frames / seconds}
  log(f'Done: {frames} frames in {seconds:.1f} s, {summary["fps"]:.1f} '
      f'frames per second. Wrote {output_path} and {jsonl_path}')
  return summary
