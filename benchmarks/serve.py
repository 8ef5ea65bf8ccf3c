"""A short load check of the server: ``python -m pspnet_jax.serve`` started on a free loopback
port, N clients posting images at once for a bounded time.

  python benchmarks/serve.py runs/synthetic --clients 4 --seconds 30 --size 96x96 \\
      --mode whole --base-size 96 --crop-size 96

Reports the warm-up time the server printed, the latency of a first and a second request of
a similar size (neither compiles: the warm-up did), then, under load: requests/s, p50/p99
latency, the failures (any status but 200, any connection error) and the server's peak RSS
(``VmHWM``). The images are synthetic_shapes examples of ``--size``; the protocol flags go
to the server as they are. Last line: the figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pspnet_jax.data.builders.synthetic_shapes import make_example  # noqa: E402
from pspnet_jax.evaluation.predict import add_protocol_arguments  # noqa: E402

START_TIMEOUT_S = 300


def images(size: str, count: int) -> list[bytes]:
  """``count`` synthetic_shapes PNGs of ``size`` (WxH): the square example, resized."""
  w, h = (int(v) for v in size.split('x'))
  out = []
  for i in range(count):
    image, _ = make_example(0, 1, i, max(w, h))
    buf = io.BytesIO()
    Image.fromarray(image).resize((w, h), Image.BILINEAR).save(buf, format='PNG')
    out.append(buf.getvalue())
  return out


def start(model_dir: str, flags: list[str], log_path: str) -> tuple[subprocess.Popen, str, str]:
  """The server process, its address and its warm-up line, once /healthz answers."""
  log = open(log_path, 'w')
  proc = subprocess.Popen(
    [sys.executable, '-m', 'pspnet_jax.serve', model_dir, '--port', '0', *flags],
    stdout=log,
    stderr=subprocess.STDOUT,
    cwd=ROOT,
    env=dict(os.environ, PYTHONUNBUFFERED='1'),
  )
  log.close()
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    lines = open(log_path).read().splitlines()
    url = next((l.split()[1] for l in lines if l.startswith('serving http')), None)
    if url:
      try:
        if httpx.get(url + 'healthz', timeout=5).status_code == 200:
          return proc, url, next(l for l in lines if l.startswith('warm-up: '))
      except httpx.HTTPError:
        pass
    if proc.poll() is not None:
      sys.exit(f'the server exited ({proc.returncode}):\n' + '\n'.join(lines[-20:]))
    time.sleep(0.2)
  proc.kill()
  sys.exit(f'no server after {START_TIMEOUT_S} s')


def peak_rss_gib(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    kib = next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))
  return kib / 2**20


def post(client: httpx.Client, url: str, png: bytes) -> tuple[float, dict | None]:
  t = time.perf_counter()
  r = client.post(url + 'v1/segment', content=png, headers={'Content-Type': 'image/png'})
  return time.perf_counter() - t, (r.json() if r.status_code == 200 else None)


def load(url: str, pool: list[bytes], clients: int, seconds: float) -> dict:
  """``clients`` threads, each with its own connection, posting until ``seconds`` pass."""
  latencies, failures, lock = [], [], threading.Lock()
  stop = time.monotonic() + seconds

  def client(k: int):
    with httpx.Client(timeout=120) as c:
      i = k
      while time.monotonic() < stop:
        try:
          dt, body = post(c, url, pool[i % len(pool)])
          error = None if body is not None else 'a status other than 200'
        except httpx.HTTPError as e:
          dt, error = 0.0, repr(e)
        with lock:
          if error is None:
            latencies.append(dt)
          else:
            failures.append(error)
        i += clients

  start = time.monotonic()
  threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.monotonic() - start
  ms = np.asarray(latencies) * 1000
  return {
    'requests': len(latencies),
    'failures': len(failures),
    'requests_per_s': round(len(latencies) / wall, 2),
    'p50_ms': round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
    'p99_ms': round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
    'wall_s': round(wall, 1),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('model_dir', nargs='?', default='runs/synthetic')
  ap.add_argument('--clients', type=int, default=4, help='concurrent clients')
  ap.add_argument('--seconds', type=float, default=30, help='how long the load runs')
  ap.add_argument('--size', default='96x96', help='image size WxH (also the warm-up size)')
  add_protocol_arguments(ap)
  args = ap.parse_args()
  flags = ['--mode', args.mode, '--scales', ','.join(map(str, args.scales))]
  flags += ['--flip' if args.flip else '--no-flip', '--base-size', str(args.base_size)]
  flags += ['--crop-size', str(args.crop_size), '--window-batch', str(args.window_batch)]
  flags += ['--warm-up', args.size]
  log_path = os.path.join(ROOT, 'runs', 'benchmark_serve.log')
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  proc, url, warm_line = start(args.model_dir, flags, log_path)
  try:
    print(warm_line)
    w, h = (int(v) for v in args.size.split('x'))
    pool = images(args.size, 8)
    similar = images(f'{w - 3}x{h - 2}', 1)[0]  # another size of the same bucket
    new_bucket = images(f'{2 * w}x{2 * h}', 2)  # a size the warm-up did not compile
    with httpx.Client(timeout=300) as c:
      first_s, first = post(c, url, pool[0])
      second_s, second = post(c, url, similar)
      cold = [post(c, url, png) for png in new_bucket]
    print(
      f'first request {args.size}: {1000 * first_s:.1f} ms (compiled: {first["compiled"]}); '
      f'second, {w - 3}x{h - 2}: {1000 * second_s:.1f} ms (compiled: {second["compiled"]}); '
      f'a new bucket, {2 * w}x{2 * h}: first {1000 * cold[0][0]:.1f} ms (compiled: '
      f'{cold[0][1]["compiled"]}), second {1000 * cold[1][0]:.1f} ms (compiled: '
      f'{cold[1][1]["compiled"]})'
    )
    result = load(url, pool, args.clients, args.seconds)
    result['peak_rss_gib'] = round(peak_rss_gib(proc.pid), 3)
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
  print(
    f'{args.clients} clients, {result["wall_s"]} s: {result["requests"]} requests, '
    f'{result["requests_per_s"]} requests/s, p50 {result["p50_ms"]} ms, p99 {result["p99_ms"]} '
    f'ms, {result["failures"]} failed; server peak RSS {result["peak_rss_gib"]} GiB'
  )
  result.update(
    warm_up=warm_line,
    first_ms=round(1000 * first_s, 1),
    second_ms=round(1000 * second_s, 1),
    first_compiled=first['compiled'],
    second_compiled=second['compiled'],
    new_bucket_first_ms=round(1000 * cold[0][0], 1),
    new_bucket_second_ms=round(1000 * cold[1][0], 1),
  )
  print('RESULT ' + json.dumps(result))
  return 1 if result['failures'] else 0


if __name__ == '__main__':
  sys.exit(main())
