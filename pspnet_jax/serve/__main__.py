"""Serve a model: a page to upload a photo and see it segmented, and a JSON API.

  python -m pspnet_jax.serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--mode whole|slide]
      [--scales 0.5,1.0,...] [--flip|--no-flip] [--base-size N] [--crop-size N]
      [--max-pixels N] [--max-upload-mb M] [--warm-up WxH,...]

``MODEL_DIR`` is what ``predict --checkpoint`` takes (a port CLI output, a training workdir,
one of its ``checkpoints/<step>``); the protocol flags are ``predict``'s, with its defaults,
so the server's labels are ``predict``'s. At start the model is compiled and run once for
the shape bucket of each ``--warm-up`` size (default: the ``--base-size`` square), and the
time it took printed; an image of another bucket compiles once, on its first request.
``--port 0`` takes a free port; the address served is printed. Ctrl-C stops it (exit
status 130). Needs the serve extra: ``pip install -e '.[serve]'``.
"""

from __future__ import annotations

import argparse
import socket
import sys

from pspnet_jax import errors
from pspnet_jax.errors import UserError
from pspnet_jax.evaluation.predict import add_protocol_arguments, protocol_config

DEFAULT_MAX_PIXELS = 40_000_000  # a 7728 x 5152 photo; larger ones are refused (413)
DEFAULT_MAX_UPLOAD_MB = 20


def port_number(text: str) -> int:
  """An argparse ``type``: a TCP port, 0..65535 (0: a free one)."""
  port = errors.int_at_least(0)(text)
  if port > 65535:
    raise argparse.ArgumentTypeError(f'{port} is out of range: give a port in 0..65535')
  return port


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
    prog='python -m pspnet_jax.serve', description=__doc__.split('\n\n')[0]
  )
  ap.add_argument('model_dir', help='model directory (port CLI output, training workdir or step)')
  ap.add_argument('--host', default='127.0.0.1', help='address to listen on (default loopback)')
  ap.add_argument('--port', type=port_number, default=8000, help='0: a free port')
  add_protocol_arguments(ap)
  ap.add_argument(
    '--max-pixels',
    type=errors.int_at_least(1),
    default=DEFAULT_MAX_PIXELS,
    help=f'refuse images of more pixels, width x height (default {DEFAULT_MAX_PIXELS})',
  )
  ap.add_argument(
    '--max-upload-mb',
    type=float,
    default=DEFAULT_MAX_UPLOAD_MB,
    help=f'refuse image files larger than this many MiB (default {DEFAULT_MAX_UPLOAD_MB})',
  )
  ap.add_argument(
    '--warm-up',
    default=None,
    help='image sizes WxH,... whose programs are compiled at start (default: the base size '
    "square; '' for none)",
  )
  return ap


def listen(host: str, port: int) -> socket.socket:
  """A socket bound to ``host:port`` before the model is loaded: a taken port is said at
  once, not after the warm-up."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    raise UserError(
      f'cannot listen on {host}:{port} ({e.strerror or e}): give another --port or --host'
    ) from None
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


@errors.command
def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if args.max_upload_mb <= 0:
    raise UserError(f'--max-upload-mb {args.max_upload_mb:g}: give a size > 0')
  try:
    import uvicorn

    from pspnet_jax.serve.app import MIB, Limits, create_app
  except ImportError as e:
    raise UserError(
      f'serving needs the serve extra ({e.name} is not installed): pip install -e ".[serve]"'
    ) from None
  from pspnet_jax.serve.segmenter import Segmenter, parse_sizes

  config = protocol_config(args)
  sizes = (
    [(config.base_size, config.base_size)] if args.warm_up is None else parse_sizes(args.warm_up)
  )
  sock = listen(args.host, args.port)
  segmenter = Segmenter(args.model_dir, config)
  print(f'loaded {args.model_dir} in {segmenter.load_s:.1f} s', flush=True)
  seconds = segmenter.warm_up(sizes)
  print(
    f'warm-up: {segmenter.evaluator.compilations} program(s) compiled and run for '
    f'{", ".join(f"{w}x{h}" for h, w in sizes) or "no size"} in {seconds:.1f} s',
    flush=True,
  )
  app = create_app(
    segmenter,
    Limits(max_pixels=args.max_pixels, max_upload_bytes=int(args.max_upload_mb * MIB)),
  )
  host, port = sock.getsockname()[:2]
  shown = f'[{host}]' if ':' in host else host
  print(f'serving http://{shown}:{port}/ (Ctrl-C stops)', flush=True)
  server = uvicorn.Server(uvicorn.Config(app, log_level='info', timeout_graceful_shutdown=10))
  try:
    server.run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the Ctrl-C again
    print('interrupted: the server stopped', file=sys.stderr)
    return errors.EXIT_INTERRUPTED
  return 0


if __name__ == '__main__':
  sys.exit(main())
