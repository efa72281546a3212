"""A convolution whose input gradient stays on XLA:CPU's fast path inside attack loops.

Inside a `lax.fori_loop` body (every PGD, CW and APGD iteration), XLA:CPU folds the flipped,
transposed kernel of a convolution's input gradient into the convolution's dimension labels
(`b01f_01oi`) instead of materialising it, and leaves its fast convolution path: on 2 CPU
cores a width-16 ResNet-18 input gradient ran ~7x slower in the loop than outside it
(jax 0.10.2; the same as jax issue #12868). `conv_general_dilated` computes the same
values as `lax.conv_general_dilated`; on the CPU backend its input gradient convolves with
the flipped kernel materialised behind an optimization barrier, which keeps the canonical
layout. Every network passes it to `nn.Conv(conv_general_dilated=...)`; other backends,
dilated or grouped convolutions and other layouts use `lax.conv_general_dilated` itself.
`conv2d` builds such a bias-free convolution with torch's or DeepMind's padding.
"""
import functools
from typing import Sequence, Tuple

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")


def _plain(lhs, rhs, strides, pads, precision):
  return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=CHANNELS_LAST,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, strides, pads, precision):
  return _plain(lhs, rhs, strides, pads, precision)


def _conv_fwd(lhs, rhs, strides, pads, precision):
  return _plain(lhs, rhs, strides, pads, precision), (lhs, rhs)


def input_gradient_padding(in_size: int, kernel: int, out_size: int, stride: int,
                           pad: Tuple[int, int]) -> Tuple[int, int]:
  """Padding of the transposed convolution (lhs dilated by `stride`) that gives d input."""
  before = kernel - 1 - pad[0]
  return before, in_size + kernel - 1 - ((out_size - 1) * stride + 1) - before


def _conv_bwd(strides, pads, precision, residuals, cotangent):
  lhs, rhs = residuals
  # The barrier keeps XLA from folding the flip and transpose into the convolution's labels.
  kernel = lax.optimization_barrier(jnp.flip(rhs, (0, 1)).swapaxes(2, 3))
  padding = [input_gradient_padding(lhs.shape[1 + d], rhs.shape[d], cotangent.shape[1 + d],
                                    strides[d], pads[d]) for d in range(2)]
  d_lhs = lax.conv_general_dilated(cotangent, kernel, (1, 1), padding, lhs_dilation=strides,
                                   dimension_numbers=CHANNELS_LAST, precision=precision)
  _, kernel_vjp = jax.vjp(lambda k: _plain(lhs, k, strides, pads, precision), rhs)
  return d_lhs.astype(lhs.dtype), kernel_vjp(cotangent)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_channels_last(lhs, rhs, dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CHANNELS_LAST))


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs):
  """lax.conv_general_dilated, with a loop-friendly input gradient on CPU (module docstring)."""
  undilated = all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if not (jax.default_backend() == "cpu" and lhs.ndim == 4 and undilated and not kwargs
          and feature_group_count == 1 and _is_channels_last(lhs, rhs, dimension_numbers)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)


def padding(size: int, strides: int, same: bool = False) -> Tuple[Tuple[int, int], ...]:
  """Explicit (before, after) padding of both spatial axes of a size x size convolution.

  torch's padding=(size - 1) // 2 pads both sides alike, also at stride 2; DeepMind's networks
  pad size - strides in all, the odd one after ((0, 1) for a strided 3x3; TensorFlow's SAME
  on even sizes).
  """
  if not same:
    return (((size - 1) // 2,) * 2,) * 2
  total = max(size - strides, 0)
  return ((total // 2, total - total // 2),) * 2


def conv2d(features: int, size: int, strides: int, *, kernel_init, dtype, name: str,
           same: bool = False) -> nn.Conv:
  """A bias-free size x size convolution padded as `padding(size, strides, same)`."""
  return nn.Conv(features, (size, size), (strides, strides), padding=padding(size, strides, same),
                 use_bias=False, kernel_init=kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)
