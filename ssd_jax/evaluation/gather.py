"""Cross-host gathering of a dataset's detections (a collective)."""

import copy
import pickle

import jax
from jax.experimental import multihost_utils
import numpy as np

from ssd_jax.evaluation import evaluate


def gather_objects(value):
  """Every host's picklable `value`, in process order (a collective)."""
  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [pickle.loads(gathered[i, :int(n)].tobytes())
          for i, n in enumerate(np.ravel(sizes))]


def gather_to_main(index, detections, ground_truth, counts):
  """All hosts' detections and ground truth, in the order of `index`.

  Args:
    index: the dataset's records.Index (every host holds the whole index).
    detections, ground_truth: this host's share, from `evaluate.detect_dataset`.
    counts: this host's records.Counts of the dataset (index-time counts,
      the same on every host, plus this host's decode failures).

  Returns:
    (detections, ground_truth, counts) of the whole dataset; on one host the
    arguments themselves.
  """
  if jax.process_count() == 1:
    return detections, ground_truth, counts
  shares = gather_objects((detections, ground_truth,
                            counts.skipped['decode_error']))
  position = {evaluate.image_id_str(image_id): i
              for i, image_id in enumerate(index.image_ids)}
  merged = sorted(
      (pair for dets, gts, _ in shares for pair in zip(dets, gts)),
      key=lambda pair: position[pair[0]['image_id']])
  total = copy.deepcopy(counts)
  total.skipped['decode_error'] = sum(share[2] for share in shares)
  return ([d for d, _ in merged], [g for _, g in merged], total)
