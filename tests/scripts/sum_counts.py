"""Process PROCESS_ID of NUM_PROCESSES on loopback sums its counts with the others'
(``pspnet_jax.mesh.sum_over_processes``, what the evaluator does with its confusion
matrices) and writes the result as an .npy. Each process's counts are
``(process_id + 1) * 3 * 2**31 + arange(C * C)`` per cell: the sum passes 2**32.

  python tests/scripts/sum_counts.py PORT PROCESS_ID NUM_PROCESSES OUT.npy
"""

import sys

import jax
import numpy as np

from pspnet_jax import mesh


def main(port, process_id, num_processes, out):
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=int(num_processes),
    process_id=int(process_id),
    initialization_timeout=120,
  )
  counts = (int(process_id) + 1) * 3 * 2**31 + np.arange(16, dtype=np.int64).reshape(4, 4)
  np.save(out, mesh.sum_over_processes(counts))
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(*sys.argv[1:])
