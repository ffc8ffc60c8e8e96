"""Document sources: each yields plain-text documents for the tokenizer and the pipeline.

Three sources, all offline:
  * `builtin_corpus`  - English text that ships with every Python (reference manual + stdlib docstrings).
  * `read_text_files` - local .txt / .jsonl files.
  * `tfds_source`     - a tensorflow-datasets dataset prepared in array_record format, read without TensorFlow.

Every source checks its inputs and raises an error that names the file and the fix before doing anything slow.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

# Folders of the standard library skipped: tests and IDLE (not reference prose), installed packages (not stdlib),
# and two big folders with almost no docstrings that would only slow parsing (codec tables; the topics' source).
_SKIPPED_STDLIB_DIRS = frozenset({
    "test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data",
})
_DOCUMENTED_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_LIKE = (ast.stmt, ast.excepthandler, ast.match_case)  # Nodes whose bodies can define functions.
_MIN_DOCSTRING_CHARS = 200
_BUILTIN_CORPUS_VERSION = 1  # Part of the cache file name: bump it when the extraction changes.


def default_cache_dir(kind: str) -> Path:
  """Where switchx caches derived files of one `kind` ("corpus", "tokenizer", ...).

  `$SWITCHX_CACHE/<kind>` when the variable is set, else `~/.cache/switchx/<kind>`.
  """
  root = os.environ.get("SWITCHX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "switchx")
  return Path(root) / kind


def write_atomically(path: Path, data: bytes) -> None:
  """Writes `data` to `path` so that readers see either the old file or the whole new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  # The temp file must live in the same directory: os.replace is only atomic within one filesystem.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a cache should be readable like any other file.
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _normalise_whitespace(text: str) -> str:
  return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------------
# Built-in corpus


def builtin_corpus(cache_dir: str | os.PathLike | None = None) -> list[str]:
  """English documents that ship with Python: about 2 MB, no download.

  The reference-manual topics of `pydoc_data.topics` followed by every standard-library docstring of at least
  200 characters (modules, classes, functions; found by parsing the sources with `ast`, so nothing is imported).
  Whitespace is collapsed to single spaces. The order is deterministic (topic names, then sorted file paths).
  The result is cached as JSON lines in `cache_dir` (default `default_cache_dir("corpus")`), keyed by the
  Python version because the text changes between versions.
  """
  cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir("corpus")
  python = "{}.{}.{}".format(*sys.version_info[:3])
  cache_file = cache_dir / f"builtin-v{_BUILTIN_CORPUS_VERSION}-python{python}.jsonl"
  if cache_file.exists():
    with open(cache_file, encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  documents = _reference_manual_topics() + _stdlib_docstrings()
  payload = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in documents)
  write_atomically(cache_file, payload.encode("utf-8"))
  return documents


def _reference_manual_topics() -> list[str]:
  from pydoc_data import topics  # ~470 KB of the language reference, shipped for help().

  texts = (_normalise_whitespace(topics.topics[name]) for name in sorted(topics.topics))
  return [text for text in texts if text]


def _stdlib_docstrings() -> list[str]:
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  documents = []
  for path in _stdlib_source_files(stdlib):
    try:
      with warnings.catch_warnings():  # Newer Pythons warn about old escape sequences in some modules.
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # A few stdlib files are deliberately invalid (e.g. lib2to3 data).
      continue
    for node in _statements(tree):
      if isinstance(node, _DOCUMENTED_NODES):
        docstring = ast.get_docstring(node, clean=False)
        if docstring:
          text = _normalise_whitespace(docstring)
          if len(text) >= _MIN_DOCSTRING_CHARS:
            documents.append(text)
  return documents


def _statements(tree: ast.Module):
  """The module and its statements at any depth, in source order.

  Docstrings belong to statements, so unlike ast.walk this never descends into expressions (most of the nodes).
  """
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    children = [child for child in ast.iter_child_nodes(node) if isinstance(child, _STATEMENT_LIKE)]
    stack.extend(reversed(children))


def _stdlib_source_files(stdlib: Path) -> list[Path]:
  files = []
  for root, dirs, names in os.walk(stdlib):
    # Pruning in place stops os.walk from descending; sorting makes the walk order deterministic.
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_STDLIB_DIRS)
    files.extend(Path(root) / name for name in names if name.endswith(".py"))
  return sorted(files)


# ----------------------------------------------------------------------------------------------------------------
# Local files


def read_text_files(paths: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = "text") -> list[str]:
  """Reads documents from local files, in the order given.

  `.txt`: documents are separated by blank lines. `.jsonl` / `.json`: one JSON object per line, the document
  is its `text_field`. Every file must exist, be UTF-8 and hold at least one document.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [Path(p) for p in paths]
  if not paths:
    raise ValueError("read_text_files got no paths; pass at least one .txt or .jsonl file.")
  for path in paths:  # Check all names first, so a typo in the last file fails before reading the first.
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such file. Check the path (relative paths start at {Path.cwd()}).")
    if path.suffix not in (".txt", ".jsonl", ".json"):
      raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .json.")

  documents = []
  for path in paths:
    text = _read_utf8(path)
    if path.suffix == ".txt":
      docs = _split_paragraphs(text)
    else:
      docs = _parse_json_lines(path, text, text_field)
    if not docs:
      raise ValueError(f"{path}: the file holds no documents (it is empty or only whitespace).")
    documents.extend(docs)
  return documents


def _read_utf8(path: Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"{path}: not valid UTF-8 (byte offset {e.start}: {data[e.start:e.start + 4]!r}). "
        f"Convert it first, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.txt`."
    ) from None


def _split_paragraphs(text: str) -> list[str]:
  paragraphs, current = [], []
  for line in text.splitlines():
    if line.strip():
      current.append(line.strip())
    elif current:
      paragraphs.append(" ".join(current))
      current = []
  if current:
    paragraphs.append(" ".join(current))
  return paragraphs


def json_records(label: str, text: str, example: str):
  """(line number, JSON object) for each non-blank line; a line that is not JSON is an error naming it."""
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      yield line_number, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{label}, line {line_number}: not valid JSON ({e.msg}). "
                       f"Each line must be one JSON object, e.g. {example}.") from None


def _parse_json_lines(path: Path, text: str, text_field: str) -> list[str]:
  documents = []
  for line_number, record in json_records(str(path), text, '{"text": "..."}'):
    if not isinstance(record, dict) or text_field not in record:
      raise ValueError(f"{path}, line {line_number}: no {text_field!r} field. "
                       "Pass text_field=... to read another field.")
    if not isinstance(record[text_field], str):
      raise ValueError(f"{path}, line {line_number}: field {text_field!r} is "
                       f"{type(record[text_field]).__name__}, expected a string.")
    if record[text_field].strip():
      documents.append(record[text_field])
  return documents


# ----------------------------------------------------------------------------------------------------------------
# tensorflow-datasets, without TensorFlow


class TfdsTextColumn(Sequence):
  """The text feature of one split of an array_record tfds dataset, read lazily by index."""

  def __init__(self, data_source, text_key: str):
    self._data_source = data_source
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):  # The array_record reader raises ValueError, not IndexError.
      raise IndexError(f"index {index} out of range for {len(self)} documents.")
    text = self._data_source[index % len(self)][self._text_key]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def tfds_source(name: str, data_dir: str | os.PathLike, split: str = "train",
                text_key: str = "text") -> TfdsTextColumn:
  """Documents of a tfds dataset already prepared in array_record format under `data_dir`.

  `name` is "dataset[/config][:version]" as in tfds ("c4/en:3.0.1"); without a version the newest prepared
  one is used. The dataset is opened from its files with `tfds.builder_from_directory`, so neither TensorFlow
  nor the dataset's builder code is needed (tfds' own `tfds.data_source(name)` would import that code and,
  unless told otherwise, start a download). Returns a lazy sequence of strings.
  """
  if data_dir is None or not Path(data_dir).is_dir():
    raise FileNotFoundError(f"tfds data_dir {data_dir!s} does not exist. Pass the directory the dataset was "
                            "prepared into (tfds' default is ~/tensorflow_datasets).")
  dataset_dir = _find_prepared_dataset(name, Path(data_dir))

  import tensorflow_datasets as tfds  # Imported here: only this source needs it.

  builder = tfds.builder_from_directory(str(dataset_dir))
  if builder.info.file_format is None or builder.info.file_format.value != "array_record":
    fmt = builder.info.file_format.value if builder.info.file_format else "unknown"
    raise ValueError(f"{dataset_dir} was prepared as {fmt}, which needs TensorFlow to read. "
                     + _how_to_prepare(name, Path(data_dir)))
  if split not in builder.info.splits:
    raise ValueError(f"{name}: no split {split!r} in {dataset_dir}; "
                     f"prepared splits: {sorted(builder.info.splits)}.")
  feature_names = list(builder.info.features.keys())
  if text_key not in feature_names:
    raise ValueError(f"{name}: no feature {text_key!r}; features are {feature_names}. Pass text_key=...")
  return TfdsTextColumn(builder.as_data_source(split=split), text_key)


def _how_to_prepare(name: str, data_dir: Path) -> str:
  name = name.split(":")[0]
  return (f"Prepare it where its source data can be reached (most builders need TensorFlow to generate, not to "
          f"read): `tfds build {name} --data_dir={data_dir} --file_format=array_record`, or in Python "
          f"`tfds.builder({name!r}, data_dir={str(data_dir)!r}, file_format='array_record')"
          ".download_and_prepare()`.")


def _find_prepared_dataset(name: str, data_dir: Path) -> Path:
  """The directory `data_dir/dataset[/config]/version` that holds a prepared dataset's dataset_info.json."""
  name_and_config, _, version = name.partition(":")
  base = data_dir / name_and_config
  if version:
    candidates = [base / version]
  else:
    candidates = sorted((p for p in base.glob("*") if p.is_dir()), key=_version_key, reverse=True)
  for candidate in candidates:
    if (candidate / "dataset_info.json").is_file():
      return candidate
  raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {data_dir} (looked for "
                          f"{base}/<version>/dataset_info.json). " + _how_to_prepare(name, data_dir))


def _version_key(path: Path) -> tuple:
  parts = path.name.split(".")
  return tuple(int(p) if p.isdigit() else -1 for p in parts)
