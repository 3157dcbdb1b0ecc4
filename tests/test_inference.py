"""inference.Detector: evaluation's detections on images of any size."""

import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import ssd300_voc
from ssd_jax import models
from ssd_jax.core import priors as priors_lib
from ssd_jax.deploy import inference
from ssd_jax.evaluation import evaluate
from ssd_jax.interop import torch_import
from ssd_jax.runtime import predict as predict_lib
from ssd_jax.runtime import variables as variables_lib
from tests import detection_checks
from tests import recipe
from tests import tiny
from tests import workdir_testing

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
VOC_TINY = os.path.join(FIXTURES, 'voc_tiny')
JPEGS = os.path.join(VOC_TINY, 'VOC2007', 'JPEGImages')


def _jpeg_paths(split='test'):
  with open(os.path.join(VOC_TINY, 'VOC2007', 'ImageSets', 'Main',
                         f'{split}.txt')) as f:
    return [os.path.join(JPEGS, f'{line.strip()}.jpg') for line in f
            if line.strip()]


@pytest.fixture(scope='module')
def tiny_voc():
  """A randomly initialised tiny SSD for the 21 VOC classes, and its config."""
  config = tiny.tiny_config(num_classes=21)
  config.data.class_names = ssd300_voc.VOC_CLASSES
  config.data.voc_root = VOC_TINY
  config.data.test = ('voc_2007_test',)
  model = models.create_model(config, nnx.Rngs(3))
  return model, config


@pytest.fixture(scope='module')
def tiny_detector(tiny_voc):
  model, config = tiny_voc
  detector = inference.Detector(model, config, batch_size=4)
  yield detector
  detector.close()


def test_resize_equals_eval_pipeline():
  """resize_for_model is the eval input pipeline's resize, to the bit."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ssd_jax.data import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = [inference.load_image(p) for p in sorted(
      os.path.join(JPEGS, name) for name in os.listdir(JPEGS))]
  images += [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
             ((1, 1), (7, 300), (299, 301), (300, 300), (1000, 37),
              (900, 1201))]
  for size, some in ((300, images), (64, images[:3] + images[-3:])):
    for image in some:
      theirs = augment.eval_transform(
          tf.io.encode_png(image), tf.constant(False), image_size=size).numpy()
      ours = inference.resize_for_model(image, size)
      assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
      np.testing.assert_array_equal(ours, theirs, err_msg=str(image.shape))


@pytest.mark.slow
def test_ssd300_reproduces_reference_detections():
  """Real-size JPEGs, the reference's weights: the reference's detections.

  The reference resizes with cv2 (our resize equals it up to the rounding of
  ~6% of the values by one level), so the detections agree approximately:
  same labels, IoU >= 0.9, scores within 0.02 for its top detections.
  """
  config = ssd300_voc.get_config()
  model = nnx.eval_shape(lambda: models.create_model(config))
  torch_import.load_detector_state_dict(model, recipe.recipe_state_dict())
  ref = np.load(os.path.join(FIXTURES, 'voc_tiny_dets.npz'))
  paths = [os.path.join(JPEGS, f'{i}.jpg') for i in ref['image_ids']]
  detector = inference.Detector(model, config, batch_size=5)
  results = detector(paths)
  detector.close()
  assert len(results) == len(paths)
  for i, result in enumerate(results):
    n = ref['num_dets'][i]
    assert result['class_names'] == [config.data.class_names[label]
                                     for label in result['labels']]
    detection_checks.assert_similar_top_detections(
        result, ref['boxes'][i, :n], ref['labels'][i, :n],
        ref['scores'][i, :n], top=20)


def test_detections_equal_evaluation(tiny_voc, tiny_detector):
  """Detector on the JPEG files == evaluate() on the eval input pipeline."""
  from ssd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  model, config = tiny_voc
  model_def, params, model_state = variables_lib.split_model(model)
  state = variables_lib.ModelVariables(params=params, model_state=model_state)
  predict_step = predict_lib.make_predict_step(config, model_def)
  result = evaluate.evaluate_dataset(
      lambda images: predict_step(state, images),
      pipeline.create_eval_iterator(config, 'voc_2007_test', batch_size=4,
                                    process_index=0, process_count=1),
      priors_lib.generate_priors(config), config, config.data.class_names,
      progress=False)
  paths = [os.path.join(JPEGS, f'{d["image_id"]}.jpg')
           for d in result['detections']]
  assert len(paths) == 5
  ours = tiny_detector(paths)
  for det, theirs in zip(ours, result['detections']):
    assert len(det['scores']) > 10
    detection_checks.assert_same_detections(
        det, theirs['boxes'], theirs['labels'], theirs['scores'],
        score_atol=1e-6, box_atol=1e-3)


def test_one_compile_per_batch_size_and_batch_independence(tiny_detector):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for h, w in ((40, 50), (64, 64), (120, 90), (33, 200), (80, 81),
                         (64, 30), (300, 200), (17, 19), (90, 120))]
  batched = tiny_detector(images)  # batches of 4, 4, then 1
  tiny_detector(images[:3])  # padded to 4
  tiny_detector(images[:2])
  # Compiled for batches of 1, 2 and 4 only, whatever the image sizes.
  compiled = tiny_detector._forward._cache_size()  # pylint: disable=W0212
  assert compiled <= 3
  assert len(batched) == len(images)
  for image, det in zip(images, batched):
    [alone] = tiny_detector([image])
    assert det['boxes'].dtype == np.float32 and det['boxes'].shape[1] == 4
    assert det['labels'].min() >= 1 and det['labels'].max() <= 20
    assert np.all(np.diff(det['scores']) <= 0)
    detection_checks.assert_same_detections(
        alone, det['boxes'], det['labels'], det['scores'], score_atol=1e-5,
        box_atol=1e-2)
  assert tiny_detector([]) == []


def test_score_threshold_keeps_the_subset_above_it(tiny_detector):
  paths = _jpeg_paths()[:2]
  everything = tiny_detector(paths)
  threshold = float(np.median(everything[0]['scores']))
  above = tiny_detector(paths, score_threshold=threshold)
  assert 0 < len(above[0]['scores']) < len(everything[0]['scores'])
  for det, full in zip(above, everything):
    keep = full['scores'] > threshold
    np.testing.assert_array_equal(det['labels'], full['labels'][keep])
    np.testing.assert_allclose(det['boxes'], full['boxes'][keep])
    assert det['class_names'] == [n for n, k in zip(full['class_names'], keep)
                                  if k]


def test_files_of_any_mode_read_as_rgb(tmp_path, tiny_detector):
  rgb = np.random.default_rng(2).integers(0, 256, (50, 70, 3), np.uint8)
  image = Image.fromarray(rgb)
  files = {
      'rgb.png': image,
      'gray.png': image.convert('L'),
      'rgba.png': image.convert('RGBA'),
      'palette.bmp': image.convert('P'),
      'cmyk.jpg': image.convert('CMYK'),
  }
  for name, img in files.items():
    img.save(tmp_path / name)
  for name, img in files.items():
    loaded = inference.load_image(tmp_path / name)
    assert loaded.dtype == np.uint8 and loaded.shape == (50, 70, 3), name
    if name != 'cmyk.jpg':  # lossy
      np.testing.assert_array_equal(loaded, np.asarray(img.convert('RGB')))
  by_path = tiny_detector([tmp_path / 'gray.png'])
  by_array = tiny_detector([np.asarray(files['gray.png'].convert('RGB'))])
  np.testing.assert_array_equal(by_path[0]['boxes'], by_array[0]['boxes'])


def test_bad_inputs_are_named(tmp_path, tiny_detector):
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8 not really a jpeg')
  with pytest.raises(ValueError, match='broken.jpg: cannot be read'):
    tiny_detector([np.zeros((8, 8, 3), np.uint8), broken])
  with pytest.raises(FileNotFoundError):
    tiny_detector([tmp_path / 'missing.png'])
  with pytest.raises(ValueError,
                     match=r'image 1: expected a uint8 \[H, W, 3\]'):
    tiny_detector([np.zeros((8, 8, 3), np.uint8),
                   np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match='image 0: expected'):
    tiny_detector([np.zeros((8, 8), np.uint8)])


def test_from_workdir(tmp_path, tiny_voc, tiny_detector):
  model, config = tiny_voc
  workdir = workdir_testing.save_workdir(tmp_path / 'w', config, model,
                                         step=7)
  detector = inference.Detector.from_workdir(workdir, batch_size=4)
  assert detector.step == 7
  assert detector.class_names == ssd300_voc.VOC_CLASSES
  path = _jpeg_paths()[:1]
  [ours], [theirs] = detector(path), tiny_detector(path)
  detector.close()
  np.testing.assert_array_equal(ours['boxes'], theirs['boxes'])
  np.testing.assert_array_equal(ours['scores'], theirs['scores'])
  with pytest.raises(FileNotFoundError, match='config.json'):
    inference.Detector.from_workdir(str(tmp_path / 'nothing'))


def test_from_torch(tmp_path):
  torch = pytest.importorskip('torch')
  config = ssd300_voc.get_config()
  state_dict = recipe.recipe_state_dict()
  path = tmp_path / 'model_final.pth'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in state_dict.items()},
              'iteration': 5}, str(path))
  detector = inference.Detector.from_torch(str(path), config)
  expected = nnx.eval_shape(lambda: models.create_model(config))
  torch_import.load_detector_state_dict(expected, state_dict)
  expected = nnx.to_pure_dict(nnx.state(expected, nnx.Param))
  state = detector._state  # pylint: disable=protected-access
  loaded = nnx.to_pure_dict(state.params)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  detector.close()


def test_nms_on_device_gives_the_host_paths_detections(tiny_voc,
                                                       tiny_detector):
  model, config = tiny_voc
  config = config.copy_and_resolve_references()
  config.test.nms_on_device = True
  config.test.candidates_per_class = 10_000  # every prior: nothing cut
  device = inference.Detector(model, config, batch_size=4)
  paths = _jpeg_paths()
  try:
    for threshold in (0.01, 0.3):
      ours = device(paths, score_threshold=threshold)
      theirs = tiny_detector(paths, score_threshold=threshold)
      for det, host in zip(ours, theirs):
        detection_checks.assert_same_detections(
            det, host['boxes'], host['labels'], host['scores'],
            score_atol=1e-5, box_atol=1e-3)
        assert det['class_names'] == host['class_names']
    # Compiled for the two batch sizes (4, then the 1 left), not per threshold.
    assert device._forward._cache_size() == 2  # pylint: disable=protected-access
  finally:
    device.close()
