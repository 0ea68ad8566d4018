"""The embedded quickstart corpus: English text built on this machine, no downloads.

Documents are the docstrings (with call signatures) of a fixed list of Python
standard-library modules, which are PSF-licensed and present wherever Python is,
followed by templated arithmetic and ordering sentences from a seeded generator. The
docstrings give varied English with strong local structure; the templated sentences
give patterns a tiny model learns within minutes. The corpus is identical on every run
of the same Python version.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
from typing import NamedTuple

from trainer import tokenizer as tokenizer_lib

_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "inspect", "io", "ipaddress", "json",
    "logging", "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "shlex", "shutil", "statistics", "string",
    "struct", "tarfile", "tempfile", "textwrap", "threading", "timeit", "traceback",
    "types", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)
# A default value printed as "<object object at 0x7f..>" changes from run to run.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine", "ten", "eleven", "twelve")
_NUM_TEMPLATED_DOCS = 400


class QuickstartFiles(NamedTuple):
    data_path: str       # JSONL file, one {"text": ...} object per line
    tokenizer_path: str  # tokenizer.json of a byte-level BPE trained on that file


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):  # many builtins have no introspectable signature
        return ""
    return "" if _ADDRESS.search(sig) else sig


def _documented_objects(module):
    """(qualified name, object) for the module and its public classes, functions and methods."""
    yield module.__name__, module
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private or re-exported from another module
        yield f"{module.__name__}.{name}", obj
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if not attr.startswith("_") and callable(vars(obj)[attr]):
                    yield f"{module.__name__}.{name}.{attr}", getattr(obj, attr)


def _docstring_documents() -> list[str]:
    docs, seen = [], set()
    for module_name in _MODULES:
        for qualname, obj in _documented_objects(importlib.import_module(module_name)):
            doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
            doc = inspect.cleandoc(doc)
            if len(doc) < 40 or doc in seen:  # skip stubs and docs shared by many builtins
                continue
            seen.add(doc)
            header = qualname if inspect.ismodule(obj) else qualname + _signature(obj)
            docs.append(f"{header}\n\n{doc}")
    return docs


def _say(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _templated_sentence(rng: random.Random) -> str:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{_say(a).capitalize()} plus {_say(b)} is {_say(a + b)}."
    if kind == 1:
        return f"The product of {a} and {b} is {a * b}."
    if kind == 2:
        big, small = max(a, b), min(a, b)
        return f"{big} is greater than {small}." if big != small else f"{a} is equal to {b}."
    items = sorted(rng.sample(range(100), 4))
    shuffled = rng.sample(items, len(items))
    return f"Sorting {shuffled} gives {items}."


def _templated_documents() -> list[str]:
    rng = random.Random(0)
    return [" ".join(_templated_sentence(rng) for _ in range(rng.randint(4, 12)))
            for _ in range(_NUM_TEMPLATED_DOCS)]


def quickstart_corpus() -> list[str]:
    """The quickstart documents (a few hundred KB of English), in a fixed order."""
    return _docstring_documents() + _templated_documents()


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_quickstart_dataset(directory: str | os.PathLike, vocab_size: int = 1024) -> QuickstartFiles:
    """Writes `quickstart.jsonl` and a BPE `tokenizer.json` (trained on it) into `directory`."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    texts = quickstart_corpus()
    data_path = os.path.join(directory, "quickstart.jsonl")
    _write_atomically(data_path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    tokenizer_lib.train_bpe(texts, vocab_size, tokenizer_path + ".tmp")
    os.replace(tokenizer_path + ".tmp", tokenizer_path)
    return QuickstartFiles(data_path, tokenizer_path)
