"""The server (``python -m pspnet_jax.serve``): its API through Starlette's test client
against the predict CLI's labels, its refusals and limits, and its page in a real headless
Chromium, the server in a subprocess on a free loopback port."""

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from cli import ROOT, cli_env, one_error_line
from PIL import Image
from tiny_models import TINY, tiny_model

from pspnet_jax import checkpoint
from pspnet_jax.data.builders.synthetic_shapes import make_example
from pspnet_jax.evaluation.predict import protocol_config
from pspnet_jax.serve.__main__ import build_parser

pytest.importorskip('starlette', reason='the serve extra (pip install -e ".[serve]")')
from starlette.testclient import TestClient  # noqa: E402

from pspnet_jax.serve.app import Limits, create_app  # noqa: E402
from pspnet_jax.serve.segmenter import Segmenter  # noqa: E402

NAMES = ['sky', 'road', 'tree', 'car', 'person']
PALETTE = [[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200], [250, 250, 0]]
# Several windows, two scales and the flip: every step of the protocol, on a tiny model.
SETTINGS = ['--mode', 'slide', '--scales', '0.75,1.0', '--base-size', '32', '--crop-size', '17']
MAX_PIXELS = 64 * 64
MAX_UPLOAD = 40_000  # bytes
SUBPROCESS_TIMEOUT_S = 240  # a server start (import, load, compile) or a predict run


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('serve') / 'model'
  checkpoint.save_model(
    path, tiny_model(seed=1), metadata={'class_names': NAMES, 'palette': PALETTE}
  )
  return str(path)


@pytest.fixture(scope='module')
def segmenter(model_dir):
  args = build_parser().parse_args([model_dir, *SETTINGS])
  seg = Segmenter(model_dir, protocol_config(args))
  seg.warm_up([(40, 30)])
  yield seg
  seg.close()


def client(segmenter, max_pixels=MAX_PIXELS, max_upload=MAX_UPLOAD) -> TestClient:
  return TestClient(create_app(segmenter, Limits(max_pixels, max_upload)))


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _ids(png: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(png)) as im:
    return np.asarray(im)


def _test_images(folder) -> dict:
  """Files the predict CLI and the server both read: RGB, RGBA, 16-bit grayscale, and a
  JPEG whose EXIF orientation turns it (stored 24x36, shown 36x24)."""
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(folder / 'rgb.png')
  rgba = np.concatenate([rgb[::-1], rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)], -1)
  Image.fromarray(rgba).save(folder / 'rgba.png')
  gray = rng.integers(0, 256, (28, 36), dtype=np.uint8)
  Image.fromarray(gray.astype(np.uint16) * 257).save(folder / 'gray16.png')
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to view
  Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(
    folder / 'turned.jpg', exif=exif, quality=95
  )
  return {
    'rgb.png': 'image/png',
    'rgba.png': 'image/png',
    'gray16.png': 'image/png',
    'turned.jpg': 'image/jpeg',
  }


def test_segment_equals_the_predict_cli(tmp_path, model_dir, segmenter):
  """Pixel for pixel the labels ``predict`` writes with the same flags, for every kind of
  file, uploaded raw and as a form; classes counted and sorted; the PNG alone on request."""
  (tmp_path / 'in').mkdir()
  images = _test_images(tmp_path / 'in')
  run = subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.predict', str(tmp_path / 'in'), '--checkpoint', model_dir]
    + ['--out', str(tmp_path / 'out'), *SETTINGS],
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
    env=cli_env(),
    cwd=ROOT,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  http = client(segmenter)
  for i, (name, media) in enumerate(images.items()):
    data = (tmp_path / 'in' / name).read_bytes()
    if i % 2:
      r = http.post('/v1/segment', files={'file': (name, data, media)})
    else:
      r = http.post('/v1/segment', content=data, headers={'Content-Type': media})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = _ids(base64.b64decode(body['mask_png']))
    expected = np.asarray(Image.open(tmp_path / 'out' / f'{os.path.splitext(name)[0]}.png'))
    np.testing.assert_array_equal(ids, expected, err_msg=name)
    assert (body['height'], body['width']) == ids.shape
    counts = np.bincount(ids.ravel(), minlength=len(NAMES))
    assert [c['pixels'] for c in body['classes']] == sorted(counts[counts > 0], reverse=True)
    assert [(c['name'], c['pixels']) for c in body['classes']] == [
      (NAMES[c['id']], counts[c['id']]) for c in body['classes']
    ]
    assert body['timings']['inference_ms'] > 0 and body['timings']['total_ms'] > 0
    with Image.open(io.BytesIO(base64.b64decode(body['mask_png']))) as im:  # shows the colours
      np.testing.assert_array_equal(
        np.asarray(im.convert('RGB')), np.asarray(PALETTE, np.uint8)[ids]
      )
    png = http.post(
      '/v1/segment', content=data, headers={'Content-Type': media, 'Accept': 'image/png'}
    )
    assert png.status_code == 200 and png.headers['content-type'] == 'image/png'
    np.testing.assert_array_equal(_ids(png.content), expected)
  with Image.open(tmp_path / 'in' / 'turned.jpg') as im:
    assert _ids(png.content).shape == im.size  # (w, h) stored: the turned image is h x w


def _one_line_error(r, status: int, *needles) -> str:
  assert r.status_code == status, (r.status_code, r.text)
  assert r.headers['content-type'] == 'application/json'
  message = r.json()['error']
  assert '\n' not in message and list(r.json()) == ['error']
  for needle in needles:
    assert needle in message, message
  return message


def test_bad_requests_are_refused_in_one_line_and_the_server_keeps_serving(segmenter):
  http = client(segmenter)
  good = _png(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
  post = lambda data, media: http.post('/v1/segment', content=data, headers={'Content-Type': media})
  _one_line_error(post(b'hello', 'text/plain'), 415, 'text/plain', 'is not an image', 'POST')
  _one_line_error(http.post('/v1/segment', content=b'hello'), 415, 'is not an image')
  _one_line_error(post(b'hello', 'image/png'), 415, 'not an image', 'give a JPEG, PNG')
  _one_line_error(post(good[: len(good) // 2], 'image/png'), 400, 'truncated', 'intact')
  _one_line_error(post(b'', 'image/jpeg'), 400, 'empty')
  form = http.post('/v1/segment', data={'note': 'no file'}, files={})
  _one_line_error(form, 415, 'is not an image')  # a urlencoded form
  form = http.post('/v1/segment', files={'other': (None, b'text')})
  _one_line_error(form, 400, 'no file', '"file"')
  text = http.post('/v1/segment', files={'file': ('notes.txt', b'a text file', 'text/plain')})
  _one_line_error(text, 415, 'notes.txt', 'not an image')
  broken = http.post(
    '/v1/segment',
    content=b'--xyz\r\nContent-Disposition: form-data; name="file"',
    headers={'Content-Type': 'multipart/form-data; boundary=xyz'},
  )
  assert 400 <= broken.status_code < 500 and list(broken.json()) == ['error']
  _one_line_error(http.get('/v1/segment'), 405, 'POST /v1/segment')
  _one_line_error(http.get('/nowhere'), 404, '/nowhere')
  r = post(good, 'image/png')
  assert r.status_code == 200 and (r.json()['height'], r.json()['width']) == (20, 30)


def _huge_header_png(width: int, height: int) -> bytes:
  """A tiny PNG file whose header claims ``width x height`` (its data does not follow)."""
  import struct
  import zlib

  png = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
  ihdr = bytearray(png[12:29])  # b'IHDR' + 13 bytes
  ihdr[4:12] = struct.pack('>II', width, height)
  png[12:29] = ihdr
  png[29:33] = struct.pack('>I', zlib.crc32(bytes(ihdr)))
  return bytes(png)


def test_limits_of_pixels_and_upload_size(segmenter):
  """At the limits an image is served; one pixel or byte over, 413 naming the flag. The
  pixel limit is read from the header, before a huge image is decoded."""
  rng = np.random.default_rng(1)
  http = client(segmenter)
  post = lambda data: http.post('/v1/segment', content=data, headers={'Content-Type': 'image/png'})
  at = _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  assert len(at) < MAX_UPLOAD and post(at).status_code == 200
  over = _png(rng.integers(0, 256, (64, 65, 3), dtype=np.uint8))
  _one_line_error(post(over), 413, '65x64', str(MAX_PIXELS), '--max-pixels')
  _one_line_error(post(_huge_header_png(300, 200)), 413, '300x200', '--max-pixels')
  _one_line_error(post(_huge_header_png(100_000, 100_000)), 413, 'scale it down')
  big = _png(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
  assert len(big) > MAX_UPLOAD
  _one_line_error(post(big), 413, 'MiB', '--max-upload-mb')
  form = http.post('/v1/segment', files={'file': ('big.png', big, 'image/png')})
  _one_line_error(form, 413, '--max-upload-mb')
  # A server with room for it segments the same file.
  roomy = client(segmenter, max_pixels=150 * 100, max_upload=len(big))
  r = roomy.post('/v1/segment', files={'file': ('big.png', big, 'image/png')})
  assert r.status_code == 200 and (r.json()['height'], r.json()['width']) == (100, 150)


def test_model_and_health(segmenter, model_dir):
  http = client(segmenter)
  assert http.get('/healthz').json() == {'status': 'ok'}
  info = http.get('/v1/model').json()
  assert [c['name'] for c in info['classes']] == NAMES and info['palette'] == PALETTE
  assert [c['color'] for c in info['classes']] == PALETTE
  assert info['config']['num_classes'] == TINY.num_classes == len(NAMES)
  assert info['protocol']['mode'] == 'slide' and info['protocol']['scales'] == [0.75, 1.0]
  assert info['protocol']['base_size'] == 32 and info['protocol']['flip'] is True
  assert info['limits'] == {'max_pixels': MAX_PIXELS, 'max_upload_mb': MAX_UPLOAD / 2**20}
  assert info['warm_up']['sizes'] == ['30x40'] and info['warm_up']['seconds'] > 0
  paths = http.get('/openapi.json').json()['paths']
  assert sorted(paths) == ['/healthz', '/v1/model', '/v1/segment']
  assert 'image/png' in paths['/v1/segment']['post']['responses']['200']['content']
  page = http.get('/')
  assert page.status_code == 200 and '<canvas id="overlay"' in page.text
  for asset in ('/static/app.js', '/static/style.css'):
    r = http.get(asset)
    assert r.status_code == 200 and len(r.content) > 500
    assert 'http://' not in r.text and 'https://' not in r.text  # nothing from elsewhere
  assert 'https://' not in page.text and 'http://' not in page.text


def test_a_warm_bucket_does_not_compile_and_requests_run_in_turn(segmenter):
  """The warmed-up bucket (40x30 -> 128x128) serves other sizes of it without compiling;
  a new bucket compiles on its first request only. Concurrent requests all succeed, each
  with its own answer."""
  http = client(segmenter, max_pixels=200 * 200, max_upload=1 << 20)
  rng = np.random.default_rng(2)
  post = lambda a: http.post('/v1/segment', content=_png(a), headers={'Content-Type': 'image/png'})
  assert post(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).json()['compiled'] is False
  # 150x140 and 149x139: the bucket 256x256, which no other test uses.
  first = post(rng.integers(0, 256, (150, 140, 3), dtype=np.uint8)).json()
  second = post(rng.integers(0, 256, (149, 139, 3), dtype=np.uint8)).json()
  assert first['compiled'] is True and second['compiled'] is False
  images = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(6)]
  answers = [None] * len(images)

  def ask(i):
    answers[i] = post(images[i]).json()

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=SUBPROCESS_TIMEOUT_S)
  for image, answer in zip(images, answers):
    ids = _ids(base64.b64decode(answer['mask_png']))
    np.testing.assert_array_equal(ids, segmenter.evaluator.predict(image))


def test_cli_refuses_a_missing_model_and_a_taken_port(tmp_path, model_dir):
  run = lambda *args: subprocess.run(
    [sys.executable, '-m', 'pspnet_jax.serve', *args],
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT_S,
    env=cli_env(),
    cwd=ROOT,
  )
  one_error_line(run(str(tmp_path / 'nowhere'), '--port', '0'), 'nowhere')
  import socket

  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    one_error_line(run(model_dir, '--port', port), f'127.0.0.1:{port}', '--port')
  one_error_line(run(model_dir, '--port', '0', '--warm-up', 'big'), '--warm-up', 'WIDTHxHEIGHT')
  p = run(model_dir, '--port', '70000')
  assert p.returncode == 2 and '--port' in p.stderr and '0..65535' in p.stderr, p.stderr


# ------------------------------------------------------------------ the page, in Chromium


def chromium() -> str:
  """The Debian chromium; missing, a failure where apt-get could install it (CI runs
  .ci/run, which does), a skip where it could not."""
  path = shutil.which('chromium') or shutil.which('chromium-browser')
  if path:
    return path
  if shutil.which('apt-get'):
    pytest.fail('chromium is not installed: apt-get install -y chromium (.ci/run does)')
  pytest.skip('the browser test needs the chromium package, and there is no apt-get here')


def _start_server(model_dir: str, log_path, *flags) -> tuple[subprocess.Popen, str]:
  """``python -m pspnet_jax.serve`` on a free loopback port, and its address, once it says
  it serves and /healthz answers."""
  import httpx

  log = open(log_path, 'w')
  proc = subprocess.Popen(
    [sys.executable, '-m', 'pspnet_jax.serve', model_dir, '--port', '0', *flags],
    stdout=log,
    stderr=subprocess.STDOUT,
    env=cli_env(),
    cwd=ROOT,
  )
  log.close()
  deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
  while time.monotonic() < deadline:
    text = open(log_path).read()
    found = [line.split()[1] for line in text.splitlines() if line.startswith('serving http')]
    if found:
      try:
        if httpx.get(found[0] + 'healthz', timeout=5).json() == {'status': 'ok'}:
          return proc, found[0]
      except httpx.HTTPError:
        pass
    assert proc.poll() is None, f'the server exited ({proc.returncode}):\n{text[-3000:]}'
    time.sleep(0.2)
  raise AssertionError(f'no server after {SUBPROCESS_TIMEOUT_S} s:\n{open(log_path).read()}')


def _stop(proc: subprocess.Popen) -> int | None:
  """Ctrl-C, then a kill if it has not stopped within 30 s; the exit status of the Ctrl-C."""
  if proc.poll() is not None:
    return proc.returncode
  proc.send_signal(signal.SIGINT)
  try:
    return proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait(timeout=30)
    return None


@pytest.mark.browser
def test_the_page_in_a_real_browser(tmp_path, model_dir):
  """Upload through the file input; from the DOM and the canvases: the legend is the API's
  classes in its order, the overlay has the image's size, the mask's pixels are the
  palette's colours of the API's labels, hovering names the class under the pointer, no
  sideways scrolling at phone width. Ctrl-C then stops the server with exit status 130."""
  executable = chromium()
  playwright = pytest.importorskip('playwright.sync_api', reason='pip install playwright')
  import httpx

  image, _ = make_example(0, 1, 3, 96)
  photo = tmp_path / 'shapes.png'
  Image.fromarray(image).save(photo)
  proc, url = _start_server(
    model_dir, tmp_path / 'server.log', '--mode', 'whole', '--base-size', '64'
  )
  try:
    api = httpx.post(
      url + 'v1/segment',
      files={'file': ('shapes.png', photo.read_bytes(), 'image/png')},
      timeout=60,
    ).json()
    labels = _ids(base64.b64decode(api['mask_png']))
    with playwright.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=executable, args=['--no-sandbox'])
      try:
        page = browser.new_page(viewport={'width': 1100, 'height': 760})
        page.goto(url)
        page.wait_for_function("!document.getElementById('model').textContent.includes('...')")
        page.set_input_files('#file', str(photo))
        page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)")
        assert page.evaluate('document.body.dataset.state') == 'done', page.text_content('#status')
        legend = page.eval_on_selector_all(
          '#legend li',
          "els => els.map(e => [Number(e.dataset.classId), e.querySelector('.name').textContent])",
        )
        assert legend == [[c['id'], c['name']] for c in api['classes']]
        assert (
          page.evaluate(
            "['photo', 'mask', 'overlay'].map(id => [document.getElementById(id).width, document.getElementById(id).height])"
          )
          == [[96, 96]] * 3
        )
        assert '96 × 96' in page.text_content('#info') and 'inference' in page.text_content('#info')
        mask = np.array(
          page.evaluate(
            "Array.from(document.getElementById('mask').getContext('2d').getImageData(0, 0, 96, 96).data)"
          ),
          np.uint8,
        ).reshape(96, 96, 4)
        np.testing.assert_array_equal(mask[..., :3], np.asarray(PALETTE, np.uint8)[labels])
        box = page.locator('#overlay').bounding_box()
        for cls in api['classes']:
          y, x = (int(v[len(v) // 2]) for v in np.nonzero(labels == cls['id']))
          page.mouse.move(
            box['x'] + (x + 0.5) * box['width'] / 96, box['y'] + (y + 0.5) * box['height'] / 96
          )
          assert page.text_content('#hover') == cls['name']
        page.screenshot(path=str(tmp_path / 'serve.png'), full_page=True)
        assert Image.open(tmp_path / 'serve.png').size[0] == 1100
        page.set_viewport_size({'width': 390, 'height': 800})
        assert page.evaluate('document.documentElement.scrollWidth') <= 390
      finally:
        browser.close()
  finally:
    status = _stop(proc)
  log = (tmp_path / 'server.log').read_text()
  assert status == 130 and 'interrupted: the server stopped' in log, log[-3000:]
  assert 'warm-up: ' in log and 'Traceback' not in log
