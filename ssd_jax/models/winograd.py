"""3x3 stride-1 'same' convolution by Winograd's F(2x2, 3x3) algorithm.

Each 2x2 block of outputs comes from a 4x4 input tile: the tiles and the
kernel are transformed (B^T d B and G g G^T), multiplied channel-wise as 16
independent matrix products, and transformed back (A^T m A). That takes
2.25x fewer multiplications than the direct convolution; the transforms are
additions. The gradients use the same three steps with the adjoint
transforms, written out below (autodiff's version, built from padded
strided slices, took 10% longer forward + backward on conv4_x).
Used by `layers.conv` on CPU (see `layers.use_winograd`).

Results equal the direct convolution up to float rounding (relative error
~1e-6 in float32). Layout: x [N, H, W, C] (NHWC), kernel [3, 3, C, O] (HWIO),
output [N, H, W, O]; zero padding of 1 on every side.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST  # true float32 products on every backend

# G: kernel transform (4x3). The input (B^T) and output (A^T) transforms
# have 0/+-1 entries and are written as additions below.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _bt(d):
  """B^T along one axis: 4 arrays (tile rows 0..3) -> 4 transformed."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _bt_adjoint(u):
  """B (the adjoint of `_bt`): 4 transformed -> 4 tile rows."""
  return [u[0], u[1] - u[2] + u[3], u[2] + u[1] - u[0], -u[3]]


def _at(m):
  """A^T along one axis: 4 products -> 2 output rows."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _at_adjoint(o):
  """A (the adjoint of `_at`): 2 output rows -> 4 products."""
  return [o[0], o[0] + o[1], o[0] - o[1], -o[1]]


def _tiles(height, width):
  return -(-height // 2), -(-width // 2)


def _transform_input(x):
  """x [N, H, W, C] -> V: 16 arrays [N * th * tw, C] (index 4 * p + q).

  Lists of 16 arrays rather than one stacked array: XLA:CPU would copy the
  16 pieces into the stack, and the 16 products can run concurrently.
  """
  n, h, w, c = x.shape
  th, tw = _tiles(h, w)
  xp = jnp.pad(x, ((0, 0), (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)))
  rows = _bt([xp[:, a:a + 2 * th:2] for a in range(4)])  # [N, th, W+, C]
  v = []
  for r in rows:
    v += _bt([r[:, :, b:b + 2 * tw:2] for b in range(4)])
  return [vk.reshape(n * th * tw, c) for vk in v]


def _transform_input_adjoint(dv, shape):
  """The adjoint of `_transform_input`: 16 x [T, C] -> [N, H, W, C]."""
  n, h, w, c = shape
  th, tw = _tiles(h, w)
  dv = [[dv[4 * p + q].reshape(n, th, tw, c) for q in range(4)]
        for p in range(4)]
  # e[a][b]: the cotangent of input tile element (a, b), [N, th, tw, C].
  cols = [_bt_adjoint([dv[p][q] for q in range(4)]) for p in range(4)]
  e = [[None] * 4 for _ in range(4)]
  for b in range(4):
    column = _bt_adjoint([cols[p][b] for p in range(4)])
    for a in range(4):
      e[a][b] = column[a]
  # Tiles overlap by 2: padded row 2k + s gets tile k's row s and tile
  # (k - 1)'s row s + 2; the same for columns.
  def overlap_add(lo, hi, axis):
    pad_lo = [(0, 0)] * 4
    pad_hi = [(0, 0)] * 4
    pad_lo[axis] = (0, 1)
    pad_hi[axis] = (1, 0)
    return jnp.pad(lo, pad_lo) + jnp.pad(hi, pad_hi)

  phases = [[overlap_add(overlap_add(e[s][t], e[s][t + 2], 2),
                         overlap_add(e[s + 2][t], e[s + 2][t + 2], 2), 1)
             for t in range(2)] for s in range(2)]
  xp = jnp.stack([jnp.stack(phases[s], axis=3) for s in range(2)], axis=2)
  xp = xp.reshape(n, 2 * th + 2, 2 * tw + 2, c)
  return xp[:, 1:1 + h, 1:1 + w]


def _transform_output(m, shape):
  """M: 16 x [T, O] -> y [N, H, W, O]."""
  n, h, w, _ = shape
  th, tw = _tiles(h, w)
  m = [mk.reshape(n, th, tw, -1) for mk in m]
  rows = [_at([m[4 * a + b] for a in range(4)]) for b in range(4)]  # [b][p]
  y = [_at([rows[b][p] for b in range(4)]) for p in range(2)]  # y[p][q]
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)
  return y.reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]


def _transform_output_adjoint(dy):
  """The adjoint of `_transform_output`: [N, H, W, O] -> 16 x [T, O]."""
  n, h, w, o = dy.shape
  th, tw = _tiles(h, w)
  dy = jnp.pad(dy, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))
  dy = dy.reshape(n, th, 2, tw, 2, o)
  rows = [_at_adjoint([dy[:, :, p, :, q] for q in range(2)])
          for p in range(2)]  # rows[p][b]
  dm = []
  for a_col in zip(*[_at_adjoint([rows[p][b] for p in range(2)])
                     for b in range(4)]):
    dm += list(a_col)  # a_col[b] for fixed a
  return [dmk.reshape(n * th * tw, o) for dmk in dm]


def _transform_kernel(kernel):
  """[3, 3, C, O] -> U [16, C, O]."""
  g = jnp.asarray(_G, kernel.dtype)
  u = jnp.einsum('pa,qb,abco->pqco', g, g, kernel,
                 precision=_HIGHEST)
  return u.reshape(16, *kernel.shape[2:])


def _matmul(v, u):
  """16 x [T, C] times U [16, C, O] -> 16 x [T, O]."""
  return [jnp.dot(vk, u[k], precision=_HIGHEST) for k, vk in enumerate(v)]


@jax.custom_vjp
def conv3x3(x, kernel):
  """x [N, H, W, C] * kernel [3, 3, C, O] -> [N, H, W, O]; stride 1, pad 1."""
  v = _transform_input(x)
  return _transform_output(_matmul(v, _transform_kernel(kernel)), x.shape)


def _conv3x3_fwd(x, kernel):
  v = _transform_input(x)
  u = _transform_kernel(kernel)
  return _transform_output(_matmul(v, u), x.shape), (v, u, x.shape)


def _conv3x3_bwd(residuals, dy):
  v, u, shape = residuals
  dm = _transform_output_adjoint(dy)
  dv = [jnp.dot(dmk, u[k].T, precision=_HIGHEST) for k, dmk in enumerate(dm)]
  du = jnp.stack([jnp.dot(vk.T, dmk, precision=_HIGHEST)
                  for vk, dmk in zip(v, dm)])
  g = jnp.asarray(_G, du.dtype)
  dkernel = jnp.einsum('pa,qb,pqco->abco', g, g,
                       du.reshape(4, 4, *du.shape[1:]), precision=_HIGHEST)
  return _transform_input_adjoint(dv, shape), dkernel


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
