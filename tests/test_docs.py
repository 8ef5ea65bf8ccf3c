"""The docs say what the code does: every command of this project that README.md, docs/*.md,
benchmarks/README.md and CHANGELOG.md show (in fenced shell blocks and in inline code) names
a script, module or make target that exists and only flags that command accepts, every
``--config.KEY`` names a key of the config file it is given, and every relative link points
at a file (and heading) of this repository.

Fast: nothing is trained; each distinct command runs once with ``--help`` (all of them at
the same time), and the config files are loaded in this process.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cli
import pytest

ROOT = cli.ROOT
DOCS = ['README.md', 'CHANGELOG.md', 'benchmarks/README.md'] + sorted(
  os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))
)

# Placeholders the docs use on purpose: ``[--config.KEY=VALUE ...]`` (train.py: any key) and
# ``--config.eval.KEY=VALUE`` (eval.py: any key of config.eval). They name no real key.
PLACEHOLDER_CONFIG_KEYS = {'KEY', 'eval.KEY'}
# Fenced blocks in these languages are read as shell (python and yaml blocks are not; file
# trees, fenced without a language, are read too and hold no command).
SHELL_LANGUAGES = {'', 'bash', 'sh', 'shell', 'console'}
# Scripts of this project that the docs may show without an interpreter in front
# (`eval.py --workdir`, a benchmark table's `benchmarks/forward.py --depth 50`).
BARE_SCRIPT = re.compile(r'^(train\.py|eval\.py|benchmarks/\w+\.py)$')
INTERPRETER = re.compile(r'^(\S*/)?python(3(\.\d+)?)?$')
HELP_TIMEOUT_S = 120


# ------------------------------------------------------------------ reading the markdown


def _read(doc: str) -> str:
  with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
    return f.read()


FENCE = re.compile(r'^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$', re.MULTILINE | re.DOTALL)
INLINE = re.compile(r'(`+)(.+?)\1', re.DOTALL)
LINK = re.compile(r'\[([^\]]*)\]\(([^)\s]+)\)')


def _split(text: str):
  """(fenced blocks as (language, body), the text with every fenced block blanked out)."""
  blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]
  prose = FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)
  return blocks, prose


def _comment_split(line: str):
  """A shell line -> (code, comment): a comment starts at a ``#`` at the line's start or after
  whitespace, outside quotes."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch == '#' and (i == 0 or line[i - 1].isspace()):
      return line[:i], line[i + 1 :]
  return line, ''


def snippets(doc: str):
  """Every shell snippet of ``doc``: (where, code, extra flag text). ``extra`` is comment text
  that documents that command's flags: a trailing comment on the command's line, and the
  ``# Options: ...`` comment lines right after it."""
  blocks, prose = _split(_read(doc))
  found = []
  for lang, body in blocks:
    if lang not in SHELL_LANGUAGES:
      continue
    lines = body.replace('\\\n', ' ').split('\n')
    in_options = False
    for line in lines:
      code, comment = _comment_split(line)
      if code.strip():
        found.append([f'{doc}: {line.strip()[:80]}', code, comment])
        in_options = False
      elif comment and found and found[-1][0].startswith(doc):
        # '# Options: --a ...' and its continuation lines ('#          --b ...').
        if comment.strip().startswith('Options:') or (in_options and comment.startswith('  ')):
          found[-1][2] += ' ' + comment
          in_options = True
        else:
          in_options = False
  for m in INLINE.finditer(prose):
    code = ' '.join(m.group(2).split())
    found.append([f'{doc}: `{code[:80]}`', code, ''])
  return [tuple(f) for f in found]


# ------------------------------------------------------------------ finding commands


def _tokens(code: str) -> list[str]:
  # `|` inside a word is the docs' alternation (`[--flip|--no-flip]`, `[--mode whole|slide]`);
  # a pipe stands alone between spaces.
  lexer = shlex.shlex(code, posix=True, punctuation_chars='&;')
  lexer.whitespace_split = True
  lexer.commenters = ''
  try:
    return list(lexer)
  except ValueError:  # an unbalanced quote: a prose fragment, split plainly
    return code.split()


def commands(code: str) -> list[tuple[tuple[str, str], list[str]]]:
  """The project commands in a shell snippet: ((kind, name), arguments), kind one of
  'module' (``python -m pspnet_jax...``), 'script' (``train.py``, ``eval.py``,
  ``benchmarks/X.py``), 'make'. A quoted argument holding a command
  (``--command "cd x && python train.py ..."``) is searched too."""
  tokens = _tokens(code)
  found = []
  for token in tokens:
    if ' ' in token:
      found += commands(token)
  simple, current = [], []
  for token in tokens:
    if token in ('|', '||') or (token and set(token) <= set('&;')):
      simple.append(current)
      current = []
    else:
      current.append(token)
  simple.append(current)
  for words in simple:
    for i, word in enumerate(words):
      rest = words[i + 1 :]
      if INTERPRETER.match(word) and rest:
        if rest[0] == '-m' and len(rest) > 1 and rest[1].startswith('pspnet_jax'):
          found.append((('module', rest[1]), rest[2:]))
        elif BARE_SCRIPT.match(rest[0]):
          found.append((('script', rest[0]), rest[1:]))
        break
      if i == 0 and BARE_SCRIPT.match(word):
        found.append((('script', word), rest))
        break
      if word == 'make':
        targets = [w for w in rest if not w.startswith('-') and '=' not in w]
        found.append((('make', targets[0] if targets else ''), rest))
        break
  return found


FLAG = re.compile(r'^(--[A-Za-z][\w.-]*)(=(.*))?$', re.DOTALL)


def flags_of(args: list[str], extra: str = '') -> list[tuple[str, str | None]]:
  """(--name, value or None) of each flag in ``args`` (``[--a X]`` and ``[--b|--no-b]``
  included) and each ``--name`` in the comment text ``extra``."""
  found = []
  for arg in args:
    for piece in arg.lstrip('[').split('|'):
      m = FLAG.match(piece.rstrip(']') if '=' not in piece else piece)
      if m:
        found.append((m.group(1), m.group(3)))
  found += [(name, None) for name in re.findall(r'(?<![\w-])(--[A-Za-z][\w-]*)', extra)]
  return found


@functools.cache
def all_commands():
  """[(where, (kind, name), flags, args)] over every doc."""
  out = []
  for doc in DOCS:
    for where, code, extra in snippets(doc):
      for command, args in commands(code):
        out.append((where, command, flags_of(args, extra), args))
  return out


# ------------------------------------------------------------------ what the code accepts


@functools.cache
def make_targets() -> frozenset:
  with open(os.path.join(ROOT, 'Makefile')) as f:
    return frozenset(
      m.group(1) for m in re.finditer(r'^([\w.-]+)\s*:(?!=)', f.read(), re.MULTILINE)
    )


def _source(command) -> str | None:
  kind, name = command
  if kind == 'script':
    path = os.path.join(ROOT, name)
  else:
    try:
      spec = importlib.util.find_spec(name)
      if spec is not None and spec.submodule_search_locations:  # a package run with -m
        spec = importlib.util.find_spec(name + '.__main__')
    except ImportError:  # a parent package that does not exist
      return None
    if spec is None:
      return None
    path = spec.origin
  return path if path and os.path.isfile(path) else None


def _help(command) -> tuple[set, str]:
  """The flags ``command`` accepts, read from its ``--help`` (absl: ``--helpfull``)."""
  kind, name = command
  with open(_source(command), encoding='utf-8') as f:
    absl = 'from absl import' in f.read()
  argv = [sys.executable] + (['-m', name] if kind == 'module' else [name])
  argv.append('--helpfull' if absl else '--help')
  env = cli.cli_env(JAX_PLATFORMS='cpu')
  p = subprocess.run(
    argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S
  )
  text = p.stdout + p.stderr
  accepted = set()
  for line in text.splitlines():
    if not line.lstrip().startswith('-'):
      continue
    head = re.split(r'\s{2,}', line.strip())[0]
    for negatable, flag in re.findall(r'--(\[no\])?([A-Za-z][\w-]*)', head):
      accepted.add('--' + flag)
      if negatable:
        accepted.add('--no' + flag)
  return accepted, text


@pytest.fixture(scope='module')
def accepted_flags():
  """Each distinct command's accepted flags, from --help run once per command, in parallel."""
  distinct = sorted({c for _, c, _, _ in all_commands() if c[0] != 'make' and _source(c)})
  with ThreadPoolExecutor(max_workers=min(8, len(distinct))) as pool:
    results = dict(zip(distinct, pool.map(_help, distinct)))
  for command, (accepted, text) in results.items():
    assert accepted, f'{command}: no flags found in its --help output:\n{text[-2000:]}'
  return {c: a for c, (a, _) in results.items()}


@functools.cache
def config_keys(path: str) -> frozenset:
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from pspnet_jax import config_file

  return frozenset(config_file.config_keys(config_file.load(config_file.resolve(path))))


def _config_path(args: list[str]) -> str | None:
  for i, arg in enumerate(args):
    if arg == '--config' and i + 1 < len(args):
      return args[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


# ------------------------------------------------------------------ the tests


def test_the_docs_show_commands_of_every_kind():
  """The parser finds the commands (so the checks below are not vacuous)."""
  found = all_commands()
  kinds = {c for _, c, _, _ in found}
  assert len(found) > 50, found
  for expected in [
    ('script', 'train.py'),
    ('script', 'eval.py'),
    ('module', 'pspnet_jax.port'),
    ('module', 'pspnet_jax.export'),
    ('module', 'pspnet_jax.predict'),
    ('module', 'pspnet_jax.aot'),
    ('module', 'pspnet_jax.data.prepare'),
    ('make', 'run'),
    ('make', 'test'),
  ]:
    assert expected in kinds, (expected, sorted(kinds))
  assert any(c[1].startswith('benchmarks/') for c in kinds), sorted(kinds)
  assert any(name.startswith('--config.') for _, _, flags, _ in found for name, _ in flags)


def test_every_command_exists():
  missing = []
  for where, (kind, name), _, _ in all_commands():
    if kind == 'make':
      if name not in make_targets():
        missing.append(f'{where}: make target {name!r} is not in the Makefile')
    elif _source((kind, name)) is None:
      missing.append(f'{where}: {kind} {name} does not exist')
  assert not missing, '\n'.join(missing)


def test_every_flag_is_accepted(accepted_flags):
  wrong = []
  for where, command, flags, _ in all_commands():
    if command not in accepted_flags:
      continue  # make targets; a missing command fails test_every_command_exists
    for name, _ in flags:
      if name.startswith('--config.'):
        continue  # a config key: test_every_config_key_exists
      if name not in accepted_flags[command]:
        wrong.append(f'{where}: {command[1]} does not accept {name}')
  assert not wrong, '\n'.join(sorted(set(wrong)))


def test_every_config_key_exists():
  """``--config.KEY=...`` (train.py, eval.py, aot) and aot's ``--sweep KEY=...`` name keys of
  the config file the command is given (the default one without ``--config``)."""
  wrong = []
  for where, _, flags, args in all_commands():
    keys = [name[len('--config.') :] for name, _ in flags if name.startswith('--config.')]
    keys = [k for k in keys if k not in PLACEHOLDER_CONFIG_KEYS]
    keys += [value.split('=', 1)[0] for name, value in flags if name == '--sweep' and value]
    keys += [args[i + 1].split('=', 1)[0] for i, a in enumerate(args[:-1]) if a == '--sweep']
    if not keys:
      continue
    path = _config_path(args) or 'configs/synthetic.py'
    try:
      known = config_keys(path)
    except Exception as e:  # noqa: BLE001 (any fault of the config file fails the test)
      wrong.append(f'{where}: config {path}: {e}')
      continue
    wrong += [f'{where}: {path} has no key {key!r}' for key in keys if key not in known]
  assert not wrong, '\n'.join(sorted(set(wrong)))


def test_config_flags_in_prose_name_keys():
  """An inline ``--config.KEY=VALUE`` outside a command (``--config.eval.window_batch=8``)
  names a key of one of the bundled configs."""
  bundled = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
  known = set()
  for path in bundled:
    with open(path) as f:
      if 'def get_config' in f.read():
        known |= config_keys(os.path.relpath(path, ROOT))
  assert known
  wrong, seen = [], 0
  for doc in DOCS:
    for where, code, _ in snippets(doc):
      words = _tokens(code)
      if not words or not words[0].startswith('--config.'):
        continue
      for name, _ in flags_of(words):
        key = name[len('--config.') :]
        seen += 1
        if key not in known and key not in PLACEHOLDER_CONFIG_KEYS:
          wrong.append(f'{where}: no bundled config has the key {key!r}')
  assert seen, 'no --config.KEY in the prose: is the parser right?'
  assert not wrong, '\n'.join(wrong)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


@functools.cache
def anchors(path: str) -> frozenset:
  _, prose = _split(open(path, encoding='utf-8').read())
  return frozenset(_slug(m.group(1)) for m in re.finditer(r'^#{1,6}\s+(.*)$', prose, re.MULTILINE))


def _links(doc: str):
  _, prose = _split(_read(doc))
  prose = INLINE.sub(lambda m: ' ' * len(m.group(0)), prose)
  return [m.group(2) for m in LINK.finditer(prose)]


def test_relative_links_point_inside_the_repository():
  wrong = []
  root = os.path.realpath(ROOT)
  for doc in DOCS:
    here = os.path.dirname(os.path.join(ROOT, doc))
    for target in _links(doc):
      if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto:
        continue
      path, _, anchor = target.partition('#')
      full = os.path.realpath(os.path.join(here, path)) if path else os.path.join(ROOT, doc)
      if not (full == root or full.startswith(root + os.sep)):
        wrong.append(f'{doc}: {target} leaves the repository')
      elif not os.path.exists(full):
        wrong.append(f'{doc}: {target} does not exist')
      elif anchor and full.endswith('.md') and anchor not in anchors(full):
        wrong.append(f'{doc}: {target}: no heading #{anchor} in {os.path.relpath(full, ROOT)}')
  assert not wrong, '\n'.join(wrong)


def test_the_readme_links_every_page():
  linked = {os.path.normpath(t.partition('#')[0]) for t in _links('README.md')}
  pages = [d for d in DOCS if d != 'README.md']
  missing = [p for p in pages if p not in linked]
  assert not missing, f'README.md does not link {missing}'
