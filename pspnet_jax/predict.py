"""``python -m pspnet_jax.predict``: the command name of ``pspnet_jax.evaluation.predict``."""

import sys

from pspnet_jax.evaluation.predict import main

if __name__ == '__main__':
  sys.exit(main())
