"""Peak memory of predicting one large photo: ``Evaluator.predict`` (the argmax taken one
band of output rows at a time) against the argmax of ``Evaluator.probabilities`` (the
full-resolution [H, W, classes] float32 map), each in its own process.

  python benchmarks/predict_memory.py --size 6000x4000 --classes 150 --paths bands
  python benchmarks/predict_memory.py --size 6000x4000 --classes 21 --paths bands,plain

A tiny random PSPNet (the memory is the output's, not the network's), the published
single-scale protocol (slide 473, flip, base size 512). Prints one JSON line per path: peak
RSS, seconds, and a digest of the labels (equal digests: equal labels).
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
  import dataclasses

  import numpy as np

  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  from tiny_models import TINY, random_model

  from pspnet_jax.evaluation import EvalConfig, Evaluator

  h, w = (int(v) for v in args.size.split('x'))
  model = random_model(dataclasses.replace(TINY, num_classes=args.classes), seed=0)
  ev = Evaluator(model, EvalConfig())
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
  t = time.perf_counter()
  labels = ev.predict(image) if args.child == 'bands' else np.argmax(ev.probabilities(image), -1)
  seconds = time.perf_counter() - t
  print(
    'RESULT '
    + json.dumps(
      {
        'path': args.child,
        'size': args.size,
        'classes': args.classes,
        'seconds': seconds,
        'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        'labels_sha1': hashlib.sha1(labels.astype(np.int32).tobytes()).hexdigest()[:12],
      }
    )
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='6000x4000', help='HxW')
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument('--paths', default='bands', help='bands, plain or both (comma-separated)')
  ap.add_argument('--child', default=None)
  args = ap.parse_args()
  if args.child:
    return child(args)
  for path in args.paths.split(','):
    cmd = [
      sys.executable,
      __file__,
      '--child',
      path,
      '--size',
      args.size,
      '--classes',
      str(args.classes),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
    print(
      line[0][7:] if line else json.dumps({'path': path, 'error': p.stderr[-1500:]}), flush=True
    )


if __name__ == '__main__':
  main()
