// The page: upload a photo to /v1/segment, draw the photo, the class colours and the
// overlay, list the classes present, and name the class under the pointer. Plain DOM and
// canvas, nothing fetched but this server's own API.
'use strict';

const $ = (id) => document.getElementById(id);
let model = null;  // GET /v1/model
let shown = null;  // the result on the page: {width, height, ids, names, photo, mask}

async function readModel() {
  const res = await fetch('/v1/model');
  model = await res.json();
  const p = model.protocol;
  $('model').textContent = `${model.classes.length} classes; ${p.mode} mode, scales ` +
    `${p.scales.join(', ')}${p.flip ? ', flip' : ''}; images up to ` +
    `${model.limits.max_pixels.toLocaleString('en')} pixels and ${model.limits.max_upload_mb} MiB`;
}

function setStatus(text, isError) {
  $('status').textContent = text;
  $('status').classList.toggle('error', Boolean(isError));
}

function canvasOf(id, width, height) {
  const c = $(id);
  c.width = width;
  c.height = height;
  return c.getContext('2d', {willReadFrequently: true});
}

async function pngBitmap(base64) {
  const bytes = Uint8Array.from(atob(base64), (ch) => ch.charCodeAt(0));
  return createImageBitmap(new Blob([bytes], {type: 'image/png'}));
}

// The mask PNG is an index image whose palette is the model's: its pixels are palette
// colours, which map back to class ids (among the classes present, so that a colour two
// classes share is read as the one present).
function classIds(rgba, present) {
  const byColor = new Map();
  for (const c of present) {
    const [r, g, b] = model.classes[c.id].color;
    byColor.set((r << 16) | (g << 8) | b, c.id);
  }
  const ids = new Int32Array(rgba.length / 4);
  for (let i = 0; i < ids.length; i++) {
    const key = (rgba[4 * i] << 16) | (rgba[4 * i + 1] << 8) | rgba[4 * i + 2];
    ids[i] = byColor.has(key) ? byColor.get(key) : -1;
  }
  return ids;
}

function drawOverlay() {
  if (!shown) return;
  const ctx = canvasOf('overlay', shown.width, shown.height);
  if (shown.photo) ctx.drawImage(shown.photo, 0, 0, shown.width, shown.height);
  ctx.globalAlpha = shown.photo ? Number($('opacity').value) / 100 : 1;
  ctx.drawImage(shown.mask, 0, 0);
  ctx.globalAlpha = 1;
}

function drawLegend(classes, total) {
  const legend = $('legend');
  legend.replaceChildren();
  for (const c of classes) {  // largest first, as the API sorts them
    const li = document.createElement('li');
    li.dataset.classId = c.id;
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgb(${model.classes[c.id].color.join(',')})`;
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = c.name;
    const share = document.createElement('span');
    share.className = 'share';
    share.textContent = `${(100 * c.pixels / total).toFixed(1)}%`;
    li.append(swatch, name, share);
    legend.append(li);
  }
}

async function segment(file) {
  if (!file) return;
  document.body.dataset.state = 'busy';
  setStatus(`segmenting ${file.name}...`);
  try {
    if (!model) await readModel();
    const form = new FormData();
    form.append('file', file);
    const res = await fetch('/v1/segment', {method: 'POST', body: form});
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
    const {width, height} = body;
    const mask = await pngBitmap(body.mask_png);
    let photo = null;
    try {
      photo = await createImageBitmap(file, {imageOrientation: 'from-image'});
    } catch (e) {
      photo = null;  // a format this browser cannot draw (TIFF): the mask alone
    }
    const maskCtx = canvasOf('mask', width, height);
    maskCtx.drawImage(mask, 0, 0);
    const ids = classIds(maskCtx.getImageData(0, 0, width, height).data, body.classes);
    const names = new Map(body.classes.map((c) => [c.id, c.name]));
    const photoCtx = canvasOf('photo', width, height);
    if (photo) photoCtx.drawImage(photo, 0, 0, width, height);
    shown = {width, height, ids, names, photo, mask};
    drawOverlay();
    drawLegend(body.classes, width * height);
    const t = body.timings;
    $('info').textContent = `${width} × ${height} pixels; inference ${t.inference_ms.toFixed(0)} ms` +
      ` (request ${t.total_ms.toFixed(0)} ms${body.compiled ? ', compiled a new shape' : ''})`;
    $('result').hidden = false;
    setStatus(photo ? file.name : `${file.name} (this browser cannot show the photo itself)`);
    document.body.dataset.state = 'done';
  } catch (e) {
    setStatus(e.message, true);
    document.body.dataset.state = 'error';
  }
}

function nameUnderPointer(event) {
  if (!shown) return;
  const c = $('overlay');
  const rect = c.getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * shown.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * shown.height / rect.height);
  if (x < 0 || y < 0 || x >= shown.width || y >= shown.height) return;
  const id = shown.ids[y * shown.width + x];
  $('hover').textContent = id >= 0 ? shown.names.get(id) : '?';
  $('hover').dataset.classId = id;
}

$('file').addEventListener('change', (e) => segment(e.target.files[0]));
$('opacity').addEventListener('input', drawOverlay);
$('overlay').addEventListener('pointermove', nameUnderPointer);
$('overlay').addEventListener('pointerdown', nameUnderPointer);
const drop = $('drop');
for (const kind of ['dragenter', 'dragover']) {
  drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add('over'); });
}
for (const kind of ['dragleave', 'drop']) {
  drop.addEventListener(kind, () => drop.classList.remove('over'));
}
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  segment(e.dataTransfer.files[0]);
});
readModel().catch((e) => setStatus(`cannot read the model: ${e.message}`, true));
