"""Image normalisation: RGB on the 0-255 scale -> what the network sees, ``(rgb - mean) / std``.

The mean and std belong to the weights: every model carries its own in its config
(``PSPNetConfig.mean`` / ``.std``), and training, evaluation, prediction and export read
them from there. ``MEAN`` / ``STD`` are semseg's (ImageNet's), the default of every model
trained here or ported from PyTorch; the Caffe releases use their own mean and no std
(``pspnet_jax.port.caffe``). Padding an image with the mean before normalising (semseg's
crop and sliding-window padding) is therefore padding the normalised image with zeros.
"""

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet, RGB, 0-255 scale
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalize(image, mean=MEAN, std=STD) -> np.ndarray:
  """image: [..., H, W, 3] uint8 or float RGB (0-255) -> float32 ``(image - mean) / std``."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return ((np.asarray(image, np.float32) - mean) / std).astype(np.float32)
