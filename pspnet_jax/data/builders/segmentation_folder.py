"""segmentation_folder: your own images and label maps.

Builder option ``root`` (``--option root=DIR``) is a folder holding a class file and the
data in either of two layouts:

  DIR/classes.json (or classes.yaml / classes.yml)
  DIR/images/SPLIT/NAME.{jpg,jpeg,png,bmp,tif,tiff}   and   DIR/labels/SPLIT/NAME.png
or
  DIR/SPLIT.txt   lines "IMAGE LABEL", paths relative to DIR (semseg's list files)

Every SPLIT found becomes a split (e.g. train, val). Labels are single-channel PNGs (grey
or palette) of class indices 0..C-1, with 255 for pixels to ignore. The class file is

  {"classes": ["background", "building", ...],   # required, index order
   "palette": [[0, 0, 0], [128, 0, 0], ...],      # optional, RGB per class
   "base_size": 512}                              # optional, evaluation long side

or just the list of class names.
"""

import json
import os

from pspnet_jax.data.builders import base
from pspnet_jax.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
CLASS_FILES = ('classes.json', 'classes.yaml', 'classes.yml')


def read_class_file(root: str) -> dict:
  """-> {'classes': [...], 'palette': [...] or None, 'base_size': int}; errors say what to fix."""
  for name in CLASS_FILES:
    path = os.path.join(root, name)
    if os.path.isfile(path):
      break
  else:
    raise base.ManualDirError(
      f'{root} has no class file ({", ".join(CLASS_FILES)}). Write one, e.g. '
      '{"classes": ["background", "road"], "palette": [[0,0,0],[128,64,128]]}.'
    )
  with open(path) as f:
    text = f.read()
  try:
    if name.endswith('.json'):
      spec = json.loads(text)
    else:
      import yaml  # pylint: disable=g-import-not-at-top

      spec = yaml.safe_load(text)
  except Exception as e:  # json and yaml raise different types
    raise UserError(f'{path}: cannot parse the class file ({e}).') from e
  if isinstance(spec, list):
    spec = {'classes': spec}
  classes = spec.get('classes') if isinstance(spec, dict) else None
  if not classes or not all(isinstance(c, str) for c in classes) or len(classes) > 255:
    raise UserError(f'{path}: "classes" must be a list of 1..255 class names, in index order.')
  palette = spec.get('palette')
  if palette is not None and (
    len(palette) != len(classes)
    or any(len(c) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)
  ):
    raise UserError(
      f'{path}: "palette" must hold one [R, G, B] (0..255) per class ({len(classes)} classes).'
    )
  base_size = spec.get('base_size', 512)
  if not isinstance(base_size, int) or base_size <= 0:
    raise UserError(f'{path}: "base_size" must be a positive integer, got {base_size!r}.')
  return {'classes': list(classes), 'palette': palette, 'base_size': base_size}


class SegmentationFolder(base.SegmentationBuilder):
  """A user's folder; builder option root=DIR (see the module doc)."""

  DESCRIPTION = __doc__

  def __init__(self, *, root: str | None = None, **kwargs):
    self.root = os.path.abspath(root) if root else None
    self.spec = read_class_file(self.root) if self.root else None
    super().__init__(**kwargs)

  def _spec(self) -> dict:
    if self.spec is None:
      raise UserError(
        'segmentation_folder needs the folder: prepare(..., root=DIR) or '
        '--option root=DIR on the command line.'
      )
    return self.spec

  def class_names(self):
    return tuple(self._spec()['classes'])

  def palette(self):
    palette = self._spec()['palette']
    return tuple(map(tuple, palette)) if palette else super().palette()

  def base_size(self):
    return self._spec()['base_size']

  def extra_metadata(self):
    return {'builder_kwargs': {'root': self.root}}

  def _split_generators(self, dl_manager):
    del dl_manager
    root = self.root
    self._spec()
    splits = {}
    for name in sorted(os.listdir(root)):
      if name.endswith('.txt'):
        splits[name[:-4]] = self._list_file_pairs(os.path.join(root, name))
    images_dir = os.path.join(root, 'images')
    if os.path.isdir(images_dir):
      for split in sorted(os.listdir(images_dir)):
        if os.path.isdir(os.path.join(images_dir, split)) and split not in splits:
          splits[split] = self._folder_pairs(split)
    if not splits:
      raise base.ManualDirError(
        f'{root} has neither list files (SPLIT.txt) nor images/SPLIT/ folders; see '
        'docs/datasets.md, "Bring your own data".'
      )
    return self.generate_splits({split: self._raws(pairs) for split, pairs in splits.items()})

  def _list_file_pairs(self, path: str):
    pairs = []
    with open(path) as f:
      for number, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) != 2:
          raise UserError(f'{path}:{number}: expected "IMAGE LABEL", got {line.strip()!r}.')
        image, label = (os.path.join(self.root, p) for p in parts)
        pairs.append((image, label, f'{path}:{number}: '))
    return pairs

  def _folder_pairs(self, split: str):
    image_dir = os.path.join(self.root, 'images', split)
    pairs = []
    for name in sorted(os.listdir(image_dir)):
      stem, ext = os.path.splitext(name)
      if ext.lower() in IMAGE_EXTENSIONS:
        pairs.append(
          (
            os.path.join(image_dir, name),
            os.path.join(self.root, 'labels', split, f'{stem}.png'),
            '',
          )
        )
    return pairs

  def _raws(self, pairs):
    for index, (image, label, origin) in enumerate(pairs):
      ident = os.path.splitext(os.path.relpath(image, self.root))[0].replace(os.sep, '/')
      # Keyed by position: a list file may name one image twice.
      yield base.RawExample(
        key=f'{index:08d}',
        id=ident,
        image_name=origin + image,
        label_name=origin + label,
        read_image=lambda p=image: base.read_file(p),
        read_label=lambda p=label: base.read_file(p),
      )
