"""Image normalisation shared by training, evaluation and prediction (semseg's values).

Images are RGB on the 0-255 scale; the network sees ``(image - MEAN) / STD``. Padding an
image with ``MEAN`` before normalising (semseg's crop and sliding-window padding) is
therefore padding the normalised image with zeros.
"""

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255  # ImageNet, RGB, 0-255 scale
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def normalize(image) -> np.ndarray:
  """image: [..., H, W, 3] uint8 or float RGB (0-255) -> float32 normalised."""
  return ((np.asarray(image, np.float32) - MEAN) / STD).astype(np.float32)
