"""The baseline: the reference's SSD300 train step in PyTorch, timed.

    python bench/torch_step.py --batch_size=8 --steps=20 [--amp] [--device=cuda]

The network, loss and update follow the reference (lufficc/SSD) as written
down in SPEC.md sections b, e and g: VGG16 reduced-fc with L2Norm, extras and
3x3 heads (NCHW, float32), MultiBox loss with hard-negative mining by sorting,
SGD with momentum 0.9 and weight decay 5e-4. As in the reference, the targets
are encoded outside the step (there by the data-loader workers), so the timed
step is forward + loss + backward + optimizer.step() on the device. Our own
code, written from the spec; it needs torch and numpy, not TensorFlow.
The last line printed is one JSON object.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vgg_layers():
  layers, in_ch = [], 3
  for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'C', 512, 512, 512,
            'M', 512, 512, 512):
    if v == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    elif v == 'C':
      layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    else:
      layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
      in_ch = v
  layers += [nn.MaxPool2d(3, 1, 1),
             nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
             nn.ReLU(inplace=True), nn.Conv2d(1024, 1024, 1),
             nn.ReLU(inplace=True)]
  return nn.ModuleList(layers)


class L2Norm(nn.Module):

  def __init__(self, channels, scale=20.0):
    super().__init__()
    self.weight = nn.Parameter(torch.full((channels,), scale))

  def forward(self, x):
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
    return self.weight.view(1, -1, 1, 1) * x / norm


class SSD300(nn.Module):
  """VGG16-SSD300 for 21 classes, returning ([B,P,21], [B,P,4])."""

  def __init__(self, num_classes=21):
    super().__init__()
    self.num_classes = num_classes
    self.vgg = vgg_layers()
    self.l2_norm = L2Norm(512)
    extras = []
    for in_ch, mid, out, k, s, p in ((1024, 256, 512, 3, 2, 1),
                                     (512, 128, 256, 3, 2, 1),
                                     (256, 128, 256, 3, 1, 0),
                                     (256, 128, 256, 3, 1, 0)):
      extras += [nn.Conv2d(in_ch, mid, 1), nn.Conv2d(mid, out, k, s, p)]
    self.extras = nn.ModuleList(extras)
    channels = (512, 1024, 512, 256, 256, 256)
    boxes = (4, 6, 6, 6, 4, 4)
    self.cls_headers = nn.ModuleList(
        nn.Conv2d(c, b * num_classes, 3, padding=1)
        for c, b in zip(channels, boxes))
    self.reg_headers = nn.ModuleList(
        nn.Conv2d(c, b * 4, 3, padding=1) for c, b in zip(channels, boxes))
    for m in list(self.extras) + list(self.cls_headers) + list(self.reg_headers):
      nn.init.xavier_uniform_(m.weight)
      nn.init.zeros_(m.bias)

  def forward(self, x):
    features = []
    for i in range(23):  # up to the ReLU of conv4_3
      x = self.vgg[i](x)
    features.append(self.l2_norm(x))
    for i in range(23, len(self.vgg)):
      x = self.vgg[i](x)
    features.append(x)
    for i, conv in enumerate(self.extras):
      x = F.relu(conv(x), inplace=True)
      if i % 2 == 1:
        features.append(x)
    batch = x.shape[0]
    cls = [h(f).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes)
           for h, f in zip(self.cls_headers, features)]
    reg = [h(f).permute(0, 2, 3, 1).reshape(batch, -1, 4)
           for h, f in zip(self.reg_headers, features)]
    return torch.cat(cls, 1), torch.cat(reg, 1)


def multibox_loss(confidence, predicted, labels, gt_locations, neg_pos_ratio=3):
  """The reference's MultiBoxLoss: returns (reg_loss, cls_loss)."""
  num_classes = confidence.size(2)
  with torch.no_grad():
    loss = -F.log_softmax(confidence, dim=2)[:, :, 0]
    pos_mask = labels > 0
    num_neg = pos_mask.long().sum(dim=1, keepdim=True) * neg_pos_ratio
    loss[pos_mask] = -float('inf')
    _, indexes = loss.sort(dim=1, descending=True)
    _, orders = indexes.sort(dim=1)
    mask = pos_mask | (orders < num_neg)
  classification_loss = F.cross_entropy(
      confidence[mask].view(-1, num_classes), labels[mask], reduction='sum')
  pos_mask = labels > 0
  smooth_l1 = F.smooth_l1_loss(predicted[pos_mask].view(-1, 4),
                               gt_locations[pos_mask].view(-1, 4),
                               reduction='sum')
  num_pos = gt_locations[pos_mask].size(0)
  return smooth_l1 / num_pos, classification_loss / num_pos


def encoded_targets(batch_size, seed=0):
  """Targets for synthetic boxes, encoded with ssd_jax's (reference-equal) code."""
  from configs import ssd300_voc  # pylint: disable=g-import-not-at-top
  from ssd_jax.core import priors as priors_lib  # pylint: disable=g-import-not-at-top
  from ssd_jax.core import targets  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import synthetic  # pylint: disable=g-import-not-at-top
  config = ssd300_voc.get_config()
  batch = synthetic.synthetic_batch(config, batch_size, seed)
  loc, cls = targets.encode_targets(batch['boxes'], batch['labels'],
                                    batch['mask'],
                                    priors_lib.generate_priors(config))
  image = (batch['image'].astype(np.float32) -  # what the JAX step does
           np.asarray(config.input.pixel_mean, np.float32))
  image = image.transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
  return image, np.array(loc), np.array(cls).astype(np.int64)


class TorchStep:
  """The reference's train step on one device, timed a few steps at a time."""

  def __init__(self, batch_size, device='cpu', amp=False, threads=None):
    if threads:
      torch.set_num_threads(threads)
    self.device = torch.device(device)
    self.amp = amp
    torch.manual_seed(0)
    self.model = SSD300().to(self.device).train()
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3,
                                     momentum=0.9, weight_decay=5e-4)
    self.scaler = torch.amp.GradScaler(enabled=amp and device == 'cuda')
    image, loc, cls = encoded_targets(batch_size)
    self.image = torch.from_numpy(image).to(self.device)
    self.loc = torch.from_numpy(loc).to(self.device)
    self.cls = torch.from_numpy(cls).to(self.device)
    start = time.perf_counter()
    self.run(1)
    self.warmup_seconds = time.perf_counter() - start
    self.run(1)

  def _step(self):
    self.optimizer.zero_grad(set_to_none=True)
    dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
    with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp):
      confidence, predicted = self.model(self.image)
    reg, cls = multibox_loss(confidence.float(), predicted.float(), self.cls,
                             self.loc)
    loss = reg + cls
    self.scaler.scale(loss).backward()
    self.scaler.step(self.optimizer)
    self.scaler.update()
    return loss

  def run(self, steps):
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
      loss = self._step()
    value = float(loss.detach())  # synchronises
    if self.device.type == 'cuda':
      torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if not np.isfinite(value):
      raise FloatingPointError(f'non-finite loss {value}')
    return elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                      else 'cpu')
  parser.add_argument('--amp', action='store_true',
                      help='autocast (float16 on CUDA, bfloat16 on CPU)')
  parser.add_argument('--no_cudnn_benchmark', action='store_true',
                      help='leave cudnn.benchmark off (the reference sets it)')
  args = parser.parse_args()
  # The reference's train.py sets it: cuDNN picks the fastest convolution
  # algorithms for the fixed input shape; without it the baseline is slower
  # than the reference runs and a ratio against it would flatter us.
  torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
  bench = TorchStep(args.batch_size, args.device, args.amp)
  best = min(bench.run(args.steps) for _ in range(args.repeats))
  peak = None
  if bench.device.type == 'cuda':
    peak = round(torch.cuda.max_memory_allocated() / 2**20)
    name = torch.cuda.get_device_name()
  else:
    name = f'cpu ({torch.get_num_threads()} threads)'
  print(json.dumps({
      'framework': 'torch',
      'images_per_sec': args.batch_size * args.steps / best,
      'step_ms': 1000 * best / args.steps,
      'batch_size': args.batch_size,
      'dtype': ('float16' if bench.device.type == 'cuda' else 'bfloat16')
               if args.amp else 'float32',
      'steps': args.steps,
      'peak_memory_mib': peak,
      'cudnn_benchmark': torch.backends.cudnn.benchmark,
      'device': name,
      'torch': torch.__version__,
  }))


if __name__ == '__main__':
  main()
