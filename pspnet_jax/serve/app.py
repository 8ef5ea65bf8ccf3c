"""The HTTP app (Starlette): the page at ``/`` and its static files, and the API.

``POST /v1/segment``: the image as the body (``Content-Type: image/...``) or as the field
``file`` of a ``multipart/form-data`` form. Returns JSON ``{"classes": [{"id", "name",
"pixels"}, ...] (present classes, largest first), "height", "width", "timings": {...},
"compiled", "mask_png"}``, ``mask_png`` being the base64 of ``Segmenter.mask_png``; with
``Accept: image/png``, that PNG alone. ``GET /v1/model``: the model's config, classes,
palette, protocol and the server's limits. ``GET /healthz``: ``{"status": "ok"}``. ``GET /openapi.json``: the OpenAPI schema of these.

A request the server refuses gets a 4xx and one line of JSON, ``{"error": "..."}``, saying
what is wrong and what to do: 415 (not an image), 413 (over ``max_upload_bytes`` or
``max_pixels``), 400 (a damaged image, an empty body, a form without a file).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import os
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles

from pspnet_jax.errors import UserError, one_line
from pspnet_jax.evaluation.images import ImageTooLarge, NotAnImage, read_rgb
from pspnet_jax.serve.segmenter import Segmenter

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
MIB = 1 << 20
# A multipart body holds the file and its envelope (boundaries, part headers): the body may
# exceed the file limit by this much before the file itself is measured.
MULTIPART_ENVELOPE = 64 << 10
# OpenAPI, from the YAML after '---' in each endpoint's docstring (Starlette's way).
SCHEMAS = SchemaGenerator(
  {'openapi': '3.0.0', 'info': {'title': 'pspnet_jax.serve', 'version': '1'}}
)


@dataclasses.dataclass(frozen=True)
class Limits:
  max_pixels: int  # width x height of the decoded image
  max_upload_bytes: int  # the image file's size


class BadRequest(Exception):
  """A request refused with ``status`` and a one-line ``message`` (what, and what to do)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({'error': one_line(message)}, status_code=status)


def _too_large(size: int, limits: Limits) -> BadRequest:
  return BadRequest(
    413,
    f'the upload is {size / MIB:.1f} MiB, over the limit of '
    f'{limits.max_upload_bytes / MIB:g} MiB (send a smaller file, or restart the server '
    'with a larger --max-upload-mb)',
  )


async def _read_body(request: Request, cap: int, limits: Limits) -> bytes:
  """The request body, refused (413) as soon as it passes ``cap`` bytes."""
  declared = request.headers.get('content-length', '')
  if declared.isdigit() and int(declared) > cap:
    raise _too_large(int(declared), limits)
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > cap:
      raise _too_large(size, limits)
    chunks.append(chunk)
  return b''.join(chunks)


async def _form_file(request: Request, body: bytes) -> tuple[bytes, str]:
  """(bytes, name) of the form's ``file`` field (or its only file) in a multipart body."""

  async def replay():
    return {'type': 'http.request', 'body': body, 'more_body': False}

  try:
    form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
  except Exception as e:  # Starlette's MultiPartException / HTTPException: a broken form
    raise BadRequest(
      400,
      f'the multipart form cannot be read ({getattr(e, "detail", e)}): send the image as '
      'the form field "file"',
    ) from None
  files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
  upload = form.get('file') if isinstance(form.get('file'), UploadFile) else None
  upload = upload or (files[0] if len(files) == 1 else None)
  if upload is None:
    raise BadRequest(400, 'the form holds no file: send the image as the form field "file"')
  data = await upload.read()
  return data, upload.filename or 'the uploaded file'


def _wants_png(request: Request) -> bool:
  """``Accept`` asks for ``image/png`` before (or without) ``application/json``."""
  for item in request.headers.get('accept', '').split(','):
    media = item.split(';')[0].strip().lower()
    if media == 'image/png':
      return True
    if media in ('application/json', 'application/*'):
      return False
  return False


def _server_timing(timings: dict) -> str:
  return ', '.join(f'{k.removesuffix("_ms")};dur={v:.1f}' for k, v in timings.items())


def create_app(segmenter: Segmenter, limits: Limits) -> Starlette:
  """The app serving ``segmenter`` within ``limits``; see the module docstring."""

  async def segment(request: Request) -> Response:
    """Segments one image.
    ---
    summary: Segment an image
    description: The image as the body (Content-Type image/*) or as the field "file" of a
      multipart/form-data form. With Accept image/png, the mask PNG alone.
    requestBody:
      required: true
      content:
        image/*: {schema: {type: string, format: binary}}
        multipart/form-data:
          schema: {type: object, properties: {file: {type: string, format: binary}}}
    responses:
      200:
        description: classes present (largest first), height, width, timings (ms), compiled,
          mask_png (base64 PNG of the class ids, the model's palette as its own)
        content:
          application/json:
            schema:
              type: object
              properties:
                classes:
                  type: array
                  items:
                    type: object
                    properties: {id: {type: integer}, name: {type: string},
                      pixels: {type: integer}}
                height: {type: integer}
                width: {type: integer}
                timings: {type: object, additionalProperties: {type: number}}
                compiled: {type: boolean}
                mask_png: {type: string, format: byte}
          image/png: {schema: {type: string, format: binary}}
      400: {description: a damaged image, an empty body, a form without a file}
      413: {description: over --max-upload-mb or --max-pixels}
      415: {description: not an image}
    """
    start = time.perf_counter()
    media = request.headers.get('content-type', '').split(';')[0].strip().lower()
    if media == 'multipart/form-data':
      body = await _read_body(request, limits.max_upload_bytes + MULTIPART_ENVELOPE, limits)
      data, name = await _form_file(request, body)
    elif media.startswith('image/'):
      data, name = await _read_body(request, limits.max_upload_bytes, limits), 'the upload'
    else:
      raise BadRequest(
        415,
        f'Content-Type {media or "(none)"} is not an image: POST the image as the body with '
        'its image/* Content-Type, or as the field "file" of a multipart/form-data form',
      )
    if len(data) > limits.max_upload_bytes:
      raise _too_large(len(data), limits)
    if not data:
      raise BadRequest(400, f'{name} is empty: send the image file')
    received = time.perf_counter()
    try:
      image = await run_in_threadpool(
        read_rgb, io.BytesIO(data), name=name, max_pixels=limits.max_pixels
      )
    except NotAnImage as e:
      raise BadRequest(415, str(e)) from None
    except ImageTooLarge as e:
      raise BadRequest(413, str(e)) from None
    except UserError as e:
      raise BadRequest(400, f'{e}: send an intact image file') from None
    decoded = time.perf_counter()
    result = await segmenter.segment_async(image)
    segmented = time.perf_counter()
    png = await run_in_threadpool(segmenter.mask_png, result.labels)
    ms = lambda seconds: round(1000 * seconds, 2)
    timings = {
      'receive_ms': ms(received - start),
      'decode_ms': ms(decoded - received),
      'queue_ms': ms(result.queue_s),
      'inference_ms': ms(result.inference_s),
      'encode_ms': ms(time.perf_counter() - segmented),
    }
    timings['total_ms'] = ms(time.perf_counter() - start)
    headers = {'Server-Timing': _server_timing(timings)}
    if _wants_png(request):
      return Response(png, media_type='image/png', headers=headers)
    height, width = result.labels.shape
    return JSONResponse(
      {
        'classes': segmenter.class_pixels(result.labels),
        'height': height,
        'width': width,
        'timings': timings,
        'compiled': result.compiled,
        'mask_png': base64.b64encode(png).decode('ascii'),
      },
      headers=headers,
    )

  async def model(request: Request) -> Response:
    """The model served.
    ---
    summary: The model, its classes and palette, the protocol and the limits
    responses:
      200: {description: 'config, classes, palette, protocol, limits, warm_up, compilations'}
    """
    return JSONResponse(
      {
        'model_dir': segmenter.model_dir,
        'config': segmenter.model_config.to_dict(),
        'classes': [
          {'id': i, 'name': n, 'color': segmenter.palette[i].tolist()}
          for i, n in enumerate(segmenter.class_names)
        ],
        'palette': segmenter.palette.tolist(),
        'protocol': dataclasses.asdict(segmenter.config),
        'limits': {
          'max_pixels': limits.max_pixels,
          'max_upload_mb': limits.max_upload_bytes / MIB,
        },
        'warm_up': {
          'sizes': [f'{w}x{h}' for h, w in segmenter.warm_sizes],
          'seconds': round(segmenter.warm_up_s, 3),
        },
        'compilations': segmenter.evaluator.compilations,
      }
    )

  async def healthz(request: Request) -> Response:
    """Liveness.
    ---
    summary: '{"status": "ok"} once the model is loaded and warmed up'
    responses:
      200: {description: ok}
    """
    return JSONResponse({'status': 'ok'})

  async def openapi(request: Request) -> Response:
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))

  async def index(request: Request) -> Response:
    return FileResponse(os.path.join(STATIC, 'index.html'))

  async def refused(request: Request, exc: BadRequest) -> Response:
    return _error(exc.status, str(exc))

  async def failed(request: Request, exc: Exception) -> Response:
    return _error(500, f'the server failed on this request: {type(exc).__name__}: {exc}')

  async def http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
      return _error(404, f'no such page: {request.url.path} (the page is at /, the API under /v1/)')
    return _error(
      exc.status_code,
      f'{exc.detail}: {request.method} {request.url.path} (the API: POST /v1/segment, '
      'GET /v1/model, GET /healthz)',
    )

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    segmenter.close()

  return Starlette(
    routes=[
      Route('/', index),
      Route('/v1/segment', segment, methods=['POST']),
      Route('/v1/model', model),
      Route('/healthz', healthz),
      Route('/openapi.json', openapi, include_in_schema=False),
      Mount('/static', StaticFiles(directory=STATIC), name='static'),
    ],
    exception_handlers={BadRequest: refused, HTTPException: http_error, Exception: failed},
    lifespan=lifespan,
  )
