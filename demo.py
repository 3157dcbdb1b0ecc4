"""Detects objects in a folder of images, a video or a camera, and draws them.

    python demo.py --workdir=W --images_dir=DIR --output_dir=OUT
        [--score_threshold=0.7] [--step=N]
    python demo.py --workdir=W --video=clip.mp4 --output=clip_detections.mp4
    python demo.py --workdir=W --camera=0 --output=camera.mp4 --max_frames=300

Runs the checkpoint of W (the latest, or --step) on every .jpg, .jpeg, .png
and .bmp file in DIR and writes OUT/<file name> with the boxes, class names
and scores drawn, and OUT/detections.json:
{file name: [{"box": [x1, y1, x2, y2], "score", "label", "class_name"}, ...]}
(original-image pixels; an empty list when nothing scores above the
threshold). Prints one line per image (load / inference time) and a summary.
A file that cannot be read is reported and skipped.

With --video (any file OpenCV reads) or --camera, it writes --output (an
.mp4 with the detections drawn) and, next to it, a .jsonl file with one line
per frame (frame index, time, detections; see ssd_jax.deploy.video), and
prints the frames per second at the end.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir written by train.py or '
                    'import_torch.py.')
flags.DEFINE_string('images_dir', None, 'Folder of images.')
flags.DEFINE_string('output_dir', None, 'Where the drawn images and '
                    'detections.json go (with --images_dir).')
flags.DEFINE_string('video', None, 'A video file to run on.')
flags.DEFINE_integer('camera', None, 'A camera index to run on.')
flags.DEFINE_string('output', None, 'The .mp4 written for --video or '
                    '--camera; the .jsonl goes next to it.')
flags.DEFINE_integer('max_frames', None, 'Stop a video or camera after this '
                     'many frames.')
flags.DEFINE_float('score_threshold', 0.7, 'Keep detections scoring above '
                   'this.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def image_files(images_dir):
  """The image file names of `images_dir`, sorted."""
  return sorted(name for name in os.listdir(images_dir)
                if name.lower().endswith(IMAGE_EXTENSIONS) and
                os.path.isfile(os.path.join(images_dir, name)))


def _load_detector(batch_size):
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  try:
    return inference.Detector.from_workdir(FLAGS.workdir, FLAGS.step,
                                           batch_size=batch_size)
  except FileNotFoundError as e:
    sys.exit(f'demo.py: {e}')


def run_video(source):
  """--video / --camera: the drawn .mp4 and the JSON lines."""
  from ssd_jax.deploy import video  # pylint: disable=g-import-not-at-top
  if not FLAGS.output:
    sys.exit('demo.py: --output=FILE.mp4 is needed with --video or --camera')
  if isinstance(source, str) and not os.path.isfile(source):
    sys.exit(f'demo.py: --video={source} is not a file')
  jsonl_path = os.path.splitext(FLAGS.output)[0] + '.jsonl'
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  is_camera = isinstance(source, int)
  detector = _load_detector(batch_size=1 if is_camera else 8)
  try:
    video.detect_video(detector, source, FLAGS.output, jsonl_path,
                       score_threshold=FLAGS.score_threshold,
                       batch_size=1 if is_camera else 8,
                       max_frames=FLAGS.max_frames)
  except video.VideoError as e:
    sys.exit(f'demo.py: {e}')
  finally:
    detector.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax's progress lines
  sources = [f for f in ('images_dir', 'video', 'camera')
             if getattr(FLAGS, f) is not None]
  if len(sources) != 1:
    sys.exit('demo.py: give exactly one of --images_dir, --video, --camera')
  if FLAGS.video is not None or FLAGS.camera is not None:
    return run_video(FLAGS.video if FLAGS.video is not None else FLAGS.camera)
  if not FLAGS.output_dir:
    sys.exit('demo.py: --output_dir is needed with --images_dir')
  if not os.path.isdir(FLAGS.images_dir):
    sys.exit(f'demo.py: --images_dir={FLAGS.images_dir} is not a folder')
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import inference  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import video  # pylint: disable=g-import-not-at-top
  from ssd_jax.deploy import visualize  # pylint: disable=g-import-not-at-top

  names = image_files(FLAGS.images_dir)
  start = time.perf_counter()
  detector = _load_detector(batch_size=1)
  size = detector.image_size
  detector([np.zeros((size, size, 3), np.uint8)])  # compile once, up front
  print(f'Loaded {FLAGS.workdir} (step {detector.step}) and compiled in '
        f'{time.perf_counter() - start:.1f} s; {len(names)} images in '
        f'{FLAGS.images_dir}')
  os.makedirs(FLAGS.output_dir, exist_ok=True)

  detections, skipped = {}, []
  load_total = inference_total = 0.0
  for i, name in enumerate(names):
    start = time.perf_counter()
    try:
      image = inference.load_image(os.path.join(FLAGS.images_dir, name))
    except (ValueError, OSError) as e:
      skipped.append(name)
      print(f'({i + 1:04d}/{len(names):04d}) {name}: skipped, {e}')
      continue
    load_time = time.perf_counter() - start
    start = time.perf_counter()
    [result] = detector([image], score_threshold=FLAGS.score_threshold)
    inference_time = time.perf_counter() - start
    load_total += load_time
    inference_total += inference_time
    detections[name] = video.detection_records(result)
    drawn = visualize.draw_detections(
        image, result['boxes'], result['labels'], result['scores'],
        detector.class_names, score_threshold=FLAGS.score_threshold)
    Image.fromarray(drawn).save(os.path.join(FLAGS.output_dir, name))
    print(f'({i + 1:04d}/{len(names):04d}) {name}: objects '
          f'{len(result["scores"]):02d} | load {load_time * 1000:.0f}ms | '
          f'inference {inference_time * 1000:.0f}ms')

  with open(os.path.join(FLAGS.output_dir, 'detections.json'), 'w') as f:
    json.dump(detections, f, indent=1)
  done = len(detections)
  summary = f'Done: {done} images'
  if done:
    summary += (f', average load {load_total / done * 1000:.0f}ms, inference '
                f'{inference_total / done * 1000:.0f}ms per image')
  if skipped:
    summary += f'; {len(skipped)} skipped (unreadable): {", ".join(skipped)}'
  print(f'{summary}. Wrote {FLAGS.output_dir}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
