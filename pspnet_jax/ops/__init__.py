"""Pure array functions on NHWC arrays, usable without any Module: pooling, resizing and
the convolution the models use (XLA's, or CPU kernels when lowered for the CPU).

  from pspnet_jax import ops
  ops.adaptive_avg_pool(x, 6); ops.resize_bilinear(x, (473, 473), align_corners=True)
  ops.pyramid_pool(x, (1, 2, 3, 6), branch)
"""

from pspnet_jax.ops.backend import configure as configure_conv
from pspnet_jax.ops.backend import settings as conv_settings
from pspnet_jax.ops.convolution import conv, conv_padding
from pspnet_jax.ops.pooling import (
  adaptive_avg_pool,
  adaptive_pool_matrix,
  avg_pool_ceil,
  ceil_pool_matrix,
  max_pool_3x3_s2,
  pyramid_pool,
)
from pspnet_jax.ops.resize import interpolation_matrix, linear_taps, resize_bilinear

__all__ = [
  'adaptive_avg_pool',
  'adaptive_pool_matrix',
  'avg_pool_ceil',
  'ceil_pool_matrix',
  'configure_conv',
  'conv',
  'conv_padding',
  'conv_settings',
  'interpolation_matrix',
  'linear_taps',
  'max_pool_3x3_s2',
  'pyramid_pool',
  'resize_bilinear',
]
