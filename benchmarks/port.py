"""Porting a real-size PSPNet checkpoint: wall time and peak memory of the CLI.

  python benchmarks/port.py --depth 101 --classes 150
  python benchmarks/port.py --caffe --depth 101 --classes 19 --crop 713

Writes a semseg ``train_epoch_N.pth`` with random weights the way semseg saves it (DataParallel
keys, epoch, SGD state with a momentum buffer for every parameter, so the file is twice the
weights), or with ``--caffe`` a ``.caffemodel`` of the authors' Caffe layout
(tests/caffe_reference.py: ``pspnet101_cityscapes.caffemodel``'s layers at full size, as
``Net::ToProto`` writes them), then runs ``python -m pspnet_jax.port FILE --out DIR`` as a
child process and prints one JSON line: its wall time (imports included) and peak RSS. The
same figures by hand: ``/usr/bin/time -v python -m pspnet_jax.port FILE --out DIR``.
Targets (issue 3): PSPNet-101 under 60 s and 4 GiB. Needs torch (the test extra).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), '..')
)  # run from a checkout, installed or not
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from torch_reference import TorchPSPNet  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def write_semseg_checkpoint(path, depth, classes):
  """PyTorch's default init is random enough: the port does not look at values."""
  model = TorchPSPNet(num_classes=classes, depth=depth)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
  for p in model.parameters():
    opt.state[p]['momentum_buffer'] = torch.randn_like(p)
  torch.save(
    {
      'epoch': 100,
      'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
      'optimizer': opt.state_dict(),
    },
    path,
  )
  return sum(p.numel() for p in model.parameters())


def write_caffemodel(path, depth, classes, crop):
  """The released Caffe layout with random weights (the port does not look at values)."""
  import caffe_reference

  layers = caffe_reference.pspnet_net(depth, classes, crop)
  caffe_reference.write_caffemodel(
    path, caffe_reference.insert_splits(layers, inputs=('data',)), inputs=('data',)
  )
  return sum(b.size for l in layers for b in l['blobs'] if l['type'] == 'Convolution') + sum(
    2 * b.size for l in layers if l['type'] == 'BN' for b in l['blobs'][:1]
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=101)
  ap.add_argument('--classes', type=int, default=150)
  ap.add_argument(
    '--backbone-only',
    action='store_true',
    help='port the backbone and initialise fresh heads (as for ImageNet weights)',
  )
  ap.add_argument('--caffe', action='store_true', help='a .caffemodel of the Caffe release')
  ap.add_argument('--crop', type=int, default=713, help='--caffe: the trained crop (473 or 713)')
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    if args.caffe:
      src = os.path.join(tmp, f'pspnet{args.depth}.caffemodel')
      n_params = write_caffemodel(src, args.depth, args.classes, args.crop)
    else:
      src = os.path.join(tmp, 'train_epoch_100.pth')
      n_params = write_semseg_checkpoint(src, args.depth, args.classes)
    env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
    t = time.perf_counter()
    cmd = [sys.executable, '-m', 'pspnet_jax.port', src, '--out', os.path.join(tmp, 'model')]
    cmd += ['--backbone-only'] * args.backbone_only
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall_s = time.perf_counter() - t
    if proc.returncode:
      sys.exit(proc.stderr)
    # The only child this process waited for is the port (Linux reports KiB).
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
      json.dumps(
        {
          'model': f'PSPNet-{args.depth}',
          'format': 'caffemodel' if args.caffe else 'pth',
          'classes': args.classes,
          'parameters': n_params,
          'backbone_only': args.backbone_only,
          'file_mib': round(os.path.getsize(src) / 2**20, 1),
          'port_wall_s': round(wall_s, 1),
          'port_peak_rss_mib': round(peak_kib / 1024),
          'cpus': os.cpu_count(),
          'load_average': [round(v, 1) for v in os.getloadavg()],
        }
      )
    )


if __name__ == '__main__':
  main()
