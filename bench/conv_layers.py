"""Per-layer profile of SSD300's convolutions: JAX vs PyTorch, side by side.

    python bench/conv_layers.py --batch_size=4 [--layers=conv1_2,conv4_x]

For each distinct convolution shape of SSD300's VGG16 reduced-fc backbone
and its two largest classification heads (the extras and the smaller heads
take little time), times the forward pass and forward + backward (gradients
of input and kernel) in JAX, compiled twice (with XLA's default options, and
with the options ssd_jax's steps use, `kernels.compiler_options()`), and in
PyTorch, on the same shapes, one after the other in this process. Prints
milliseconds per call and the ratio torch / jax (ssd_jax options) per layer,
and the totals weighted by how often each shape occurs in the network. Use it
to see where the train step's time goes. The last line printed is one JSON
object.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from ssd_jax.models import layers
from ssd_jax.models import winograd
from ssd_jax.runtime import kernels

# name, input size, in channels, out channels, kernel, stride, padding,
# dilation, how many times the shape occurs in SSD300.
LAYERS = (
    ('conv1_1', 300, 3, 64, 3, 1, 1, 1, 1),
    ('conv1_2', 300, 64, 64, 3, 1, 1, 1, 1),
    ('conv2_1', 150, 64, 128, 3, 1, 1, 1, 1),
    ('conv2_2', 150, 128, 128, 3, 1, 1, 1, 1),
    ('conv3_1', 75, 128, 256, 3, 1, 1, 1, 1),
    ('conv3_x', 75, 256, 256, 3, 1, 1, 1, 2),
    ('conv4_1', 38, 256, 512, 3, 1, 1, 1, 1),
    ('conv4_x', 38, 512, 512, 3, 1, 1, 1, 2),
    ('conv5_x', 19, 512, 512, 3, 1, 1, 1, 3),
    ('fc6', 19, 512, 1024, 3, 1, 6, 6, 1),
    ('fc7', 19, 1024, 1024, 1, 1, 0, 1, 1),
    ('head38_cls', 38, 512, 84, 3, 1, 1, 1, 1),
    ('head19_cls', 19, 1024, 126, 3, 1, 1, 1, 1),
)


def jax_fns(size, cin, cout, k, stride, pad, dilation, batch,
            compiler_options, allow_winograd):
  x = jnp.asarray(np.random.RandomState(0).randn(batch, size, size, cin),
                  jnp.float32)
  w = jnp.asarray(np.random.RandomState(1).randn(k, k, cin, cout) * 0.05,
                  jnp.float32)

  def conv(x, w):
    if allow_winograd and uses_winograd(size, cin, cout, k, stride, pad,
                                          dilation):
      return winograd.conv3x3(x, w)
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  out_shape = jax.eval_shape(conv, x, w).shape
  dy = jnp.asarray(np.random.RandomState(2).randn(*out_shape), jnp.float32)
  forward = jax.jit(conv, compiler_options=compiler_options)
  def forward_backward(x, w, dy):
    # A random output cotangent: a constant one (the gradient of a sum) lets
    # XLA skip work, such as transposing it for the kernel gradient. The
    # output is returned so that the forward pass is not dead code.
    y, vjp = jax.vjp(conv, x, w)
    return y, vjp(dy)

  backward = jax.jit(forward_backward, compiler_options=compiler_options)
  return (lambda: forward(x, w).block_until_ready(),
          lambda: jax.block_until_ready(backward(x, w, dy)))


def uses_winograd(size, cin, cout, k, stride, pad, dilation):
  """Whether ssd_jax's model runs this LAYERS shape as Winograd."""
  del size
  return layers.use_winograd((k, k, cin, cout), (stride, stride),
                             ((pad, pad), (pad, pad)), (dilation, dilation),
                             jnp.float32)


def torch_fns(size, cin, cout, k, stride, pad, dilation, batch):
  x = torch.randn(batch, cin, size, size, requires_grad=True)
  w = (torch.randn(cout, cin, k, k) * 0.05).requires_grad_()

  def forward():
    with torch.no_grad():
      return F.conv2d(x, w, None, stride, pad, dilation)

  with torch.no_grad():
    dy = torch.randn_like(F.conv2d(x, w, None, stride, pad, dilation))

  def backward():
    x.grad = w.grad = None
    F.conv2d(x, w, None, stride, pad, dilation).backward(dy)

  return forward, backward


def median_ms(fn, repeats):
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def _print_row(name, row, keys):
  ratio = row['torch_fwd_bwd'] / row['jax_fwd_bwd']
  print(f'{name:12s}' + ''.join(f'{row[k]:10.1f}' for k in keys) +
        f'{ratio:10.2f}', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--layers', default='', help='comma-separated names')
  args = parser.parse_args()
  options = kernels.compiler_options()
  chosen = set(args.layers.split(',')) if args.layers else None
  keys = ('xla_default_fwd', 'jax_fwd', 'torch_fwd', 'xla_default_fwd_bwd',
          'jax_fwd_bwd', 'torch_fwd_bwd')
  rows, totals = [], dict.fromkeys(keys, 0.0)
  print('milliseconds per call; "default" = XLA\'s convolution, default '
        f'options; "jax" = ssd_jax: options {options}, W = Winograd')
  print(f'{"layer":12s}' + ''.join(f'{k:>10s}' for k in (
      'default', 'jax', 'torch', 'default', 'jax', 'torch', 'f+b')))
  print(f'{"":12s}' + ''.join(f'{k:>10s}' for k in (
      'fwd', 'fwd', 'fwd', 'f+b', 'f+b', 'f+b', 'torch/jax')))
  for name, *shape, count in LAYERS:
    if chosen and name not in chosen:
      continue
    default_fwd, default_bwd = jax_fns(*shape, args.batch_size, None, False)
    jax_fwd, jax_bwd = jax_fns(*shape, args.batch_size, options, True)
    torch_fwd, torch_bwd = torch_fns(*shape, args.batch_size)
    fns = (default_fwd, jax_fwd, torch_fwd, default_bwd, jax_bwd, torch_bwd)
    row = {'layer': name, 'count': count,
           'winograd': uses_winograd(*shape)}
    for key, fn in zip(keys, fns):
      row[key] = median_ms(fn, args.repeats)
      totals[key] += count * row[key]
    rows.append(row)
    _print_row(name + (' W' if row['winograd'] else ''), row, keys)
  _print_row('total', totals, keys)
  print(json.dumps({'batch_size': args.batch_size,
                    'compiler_options': options,
                    'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'torch_threads': torch.get_num_threads(),
                    'rows': rows, 'totals': totals}))


if __name__ == '__main__':
  main()
