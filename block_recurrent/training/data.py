"""Training data: tokenizers, document corpora, and the batches a trainer consumes.

Text becomes tokens (bytes by default, vocabulary 256), documents are split into training and validation
sets by file, and batches are cut from the training documents in one of two ways:

- ``stream`` (the paper's training): every batch row reads its own stream of whole documents; each step
  continues where the previous one stopped, so the trainer carries memories and states from step to step.
  Where a row's document ends, the rest of its window is padding (label ``ignore_index``) and the next step
  starts the row's next document with ``reset`` set for that row alone.
- ``crop`` (the reference's enwik8 example): every row is a random window of the concatenated training
  tokens, and every row starts fresh each step.

The built-in corpus is the running interpreter's standard library (``*.py`` files under
``sysconfig.get_paths()["stdlib"]``, without site-packages): about 30 MB of long documents on any machine.

Validation split (fixed, by file): a document is held out when ``zlib.crc32(name) % 100 < 5``, ``name`` being
its path relative to the data root with ``/`` separators (about 5% of the files). A source of a single
document holds out its last 5% instead; a split that would leave either side empty moves one document over.
"""

from __future__ import annotations

import gzip
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..model.checks import check_int

VALIDATION_PERCENT = 5  # share of files held out, by crc32 of their relative path (see the module docstring)
_SNIFF_BYTES = 8192  # a file whose first bytes hold NUL or invalid UTF-8 is not text


# tokenizers: one vocabulary throughout; encode text to ids, decode ids to text


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, one token per byte."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes"}


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer saved as one JSON file (needs the ``tokenizers`` extra)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer: no tokenizer file at {path}")
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as error:
            raise ImportError(
                "a tokenizer file needs the `tokenizers` package: pip install 'block-recurrent[tokenizers]'"
            ) from error
        try:
            self._tokenizer = HFTokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises its own exception type
            raise ValueError(f"tokenizer: {path} is not a valid tokenizers JSON file ({error})") from error
        self.path = path
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {"kind": "tokenizers", "path": str(self.path)}


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """Bytes when ``path`` is None, else a ``tokenizers`` JSON file."""
    return ByteTokenizer() if path is None else FileTokenizer(path)


# documents: named texts, read from files, folders, .gz files, the standard library or a HF dataset


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the data root ("/" separators): the key of the validation split
    text: str


def _read_text(path: Path, *, strict: bool) -> str | None:
    """The UTF-8 text of a file (.gz decompressed); None for a non-text file unless ``strict``, which raises."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        if strict:
            raise ValueError(f"data: cannot read {path}: {error}") from error
        return None
    sniff = raw[:_SNIFF_BYTES]
    try:
        if b"\x00" in sniff:
            raise UnicodeDecodeError("utf-8", sniff, 0, 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise ValueError(f"data: {path} is not a UTF-8 text file (binary data or another encoding)") from None
        return None
    return text


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_documents() -> list[Document]:
    """The running interpreter's standard-library ``*.py`` files (site-packages excluded), sorted by path."""
    root = stdlib_root()
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if {"site-packages", "dist-packages", "__pycache__"} & set(relative.parts):
            continue
        text = _read_text(path, strict=False)
        if text:
            documents.append(Document(relative.as_posix(), text))
    if not documents:
        raise ValueError(f"data: found no standard-library sources under {root}")
    return documents


def path_documents(path: str | Path) -> list[Document]:
    """A text file, a ``.gz`` text file, or a folder of them (recursively; hidden and non-text files skipped)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data: {path} does not exist")
    if path.is_file():
        text = _read_text(path, strict=True)
        if not text:
            raise ValueError(f"data: {path} is empty")
        return [Document(path.name, text)]
    documents, skipped = [], 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        text = _read_text(file, strict=False)
        if text is None:
            skipped += 1
        elif text:
            documents.append(Document(relative.as_posix(), text))
    if not documents:
        detail = f" ({skipped} non-text files skipped)" if skipped else ""
        raise ValueError(f"data: {path} holds no non-empty text files{detail}")
    if skipped:
        warnings.warn(f"data: skipped {skipped} non-text files under {path}", stacklevel=2)
    return documents


def hf_documents(name: str, split: str = "train", text_field: str = "text") -> list[Document]:
    """Rows of a Hugging Face dataset (a Hub name or a local folder saved with ``save_to_disk``) as documents."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf_dataset needs the `datasets` package: pip install 'block-recurrent[hf]'") from error
    local = Path(name)
    saved = any((local / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json"))
    if local.is_dir() and saved:
        dataset = datasets.load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"hf_split: {name} has splits {sorted(dataset)}, not {split!r}")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(f"text_field: dataset {name} has columns {dataset.column_names}, not {text_field!r}")
    documents = [Document(f"{split}/{i:08d}", text) for i, text in enumerate(dataset[text_field]) if text]
    if not documents:
        raise ValueError(f"hf_dataset: {name} ({split}) has no non-empty {text_field!r} rows")
    return documents


def load_documents(
    data: str | Path | None = None, *, hf_dataset: str | None = None, hf_split: str = "train", text_field: str = "text"
) -> list[Document]:
    """Documents from exactly one source: ``data`` (path), ``hf_dataset``, or neither (the built-in corpus)."""
    if data is not None and hf_dataset is not None:
        raise ValueError("give either data (a path) or hf_dataset (a dataset name), not both")
    if hf_dataset is not None:
        return hf_documents(hf_dataset, hf_split, text_field)
    if data is None:
        return builtin_documents()
    return path_documents(data)


def gzip_bits_per_byte(documents: Sequence[Document]) -> float:
    """gzip -9's bits per byte of the documents' UTF-8 text, each document compressed alone (as a model reads
    them, each from a fresh state): the yardstick `brt train` prints beside its held-out score."""
    raw = [d.text.encode("utf-8") for d in documents]
    return 8 * sum(len(gzip.compress(b, 9)) for b in raw) / max(sum(len(b) for b in raw), 1)


def is_validation(name: str, percent: int = VALIDATION_PERCENT) -> bool:
    return zlib.crc32(name.encode("utf-8")) % 100 < percent


def split_documents(
    documents: Sequence[Document], percent: int = VALIDATION_PERCENT
) -> tuple[list[Document], list[Document]]:
    """The fixed train/validation split described in the module docstring (``percent``: the share held out)."""
    if not documents:
        raise ValueError("data: no documents to split")
    if len(documents) == 1:
        doc = documents[0]
        cut = len(doc.text) - max(1, len(doc.text) * VALIDATION_PERCENT // 100)
        if cut < 1:
            raise ValueError(f"data: {doc.name} is too short to split into training and validation text")
        return [Document(doc.name, doc.text[:cut])], [Document(doc.name + "#validation", doc.text[cut:])]
    train = [d for d in documents if not is_validation(d.name, percent)]
    val = [d for d in documents if is_validation(d.name, percent)]
    if not val:
        train, val = train[:-1], train[-1:]
    if not train:
        train, val = val[:1], val[1:]
    return train, val


# corpora: the tokens of many documents, packed end to end


class TokenCorpus:
    """Documents tokenised and packed into one array; ``offsets[i]:offsets[i + 1]`` is document i."""

    def __init__(self, names: list[str], tokens: np.ndarray, offsets: np.ndarray, num_bytes: int):
        self.names = names
        self.tokens = tokens
        self.offsets = offsets
        self.num_bytes = num_bytes

    @classmethod
    def from_documents(cls, documents: Sequence[Document], tokenizer: Tokenizer) -> "TokenCorpus":
        encoded = [(d.name, tokenizer.encode(d.text), len(d.text.encode("utf-8"))) for d in documents]
        encoded = [(name, ids, size) for name, ids, size in encoded if len(ids)]
        if not encoded:
            raise ValueError("data: the documents hold no tokens")
        lengths = np.array([len(ids) for _, ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        tokens = np.concatenate([ids for _, ids, _ in encoded])
        return cls([name for name, _, _ in encoded], tokens, offsets, sum(size for _, _, size in encoded))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def token_count(self) -> int:
        return int(self.offsets[-1])

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / self.token_count

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def cut(self, pieces: int) -> "TokenCorpus":
        """Each document cut into ``pieces`` contiguous parts (for streaming more rows than documents)."""
        names, offsets = [], [0]
        for i, name in enumerate(self.names):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            bounds = np.linspace(start, end, pieces + 1).astype(np.int64)
            for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                if hi > lo:
                    names.append(f"{name}#{part}")
                    offsets.append(int(hi))
        return TokenCorpus(names, self.tokens, np.asarray(offsets, dtype=np.int64), self.num_bytes)


# batches


@dataclass(frozen=True)
class Batch:
    """inputs, labels: (R, L) long, labels ``ignore_index`` on padding; reset: (R,) bool, True where a row
    starts a new document (fresh memory and state)."""

    inputs: Tensor
    labels: Tensor
    reset: Tensor

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(self.inputs[start:stop], self.labels[start:stop], self.reset[start:stop])


def _check_rows(rows: int, row_offset: int, total_rows: int) -> None:
    check_int("rows", rows, 1)
    check_int("row_offset", row_offset, 0)
    check_int("total_rows", total_rows, 1)
    if row_offset + rows > total_rows:
        raise ValueError(f"rows {row_offset}..{row_offset + rows - 1} exceed total_rows={total_rows}")


class DocumentStreams:
    """Rows ``row_offset .. row_offset + rows - 1`` of ``total_rows`` document streams over a corpus.

    In epoch e the documents are shuffled by ``(seed, e)``, and global row g reads documents g, g + G,
    g + 2G, ... of that order (G = total_rows), then moves on to epoch e + 1. Every row of every rank is a
    pure function of (corpus, seed, g, G): data-parallel ranks take disjoint rows, and an epoch's rows together
    read every token once. The position of each row (epoch, index in its list, offset in the document) is
    all a checkpoint needs.
    """

    def __init__(
        self, corpus: TokenCorpus, rows: int, *, row_offset: int = 0, total_rows: int | None = None,
        seed: int = 0, ignore_index: int = -100,
    ):
        total_rows = rows if total_rows is None else total_rows
        _check_rows(rows, row_offset, total_rows)
        if len(corpus) < total_rows:
            corpus = corpus.cut(-(-total_rows // len(corpus)))  # more rows than documents: cut documents
        if len(corpus) < total_rows:
            raise ValueError(f"data: {corpus.token_count} tokens cannot feed {total_rows} document streams")
        self.corpus = corpus
        self.rows, self.row_offset, self.total_rows = rows, row_offset, total_rows
        self.seed, self.ignore_index = seed, ignore_index
        self.positions = [[0, 0, 0] for _ in range(rows)]  # per row: epoch, index in its list, token offset
        self._orders: dict[int, np.ndarray] = {}

    def documents_of(self, row: int, epoch: int) -> np.ndarray:
        """Document indices that local ``row`` reads in ``epoch``, in order."""
        if epoch not in self._orders:
            if len(self._orders) > 4:  # rows drift apart by at most an epoch or two; keep the cache small
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus))
        return self._orders[epoch][self.row_offset + row :: self.total_rows]

    def next_batch(self, length: int) -> Batch:
        """The next ``length`` tokens of every row, with next-token labels (or padding past a document's end)."""
        inputs = np.zeros((self.rows, length), dtype=np.int64)
        labels = np.full((self.rows, length), self.ignore_index, dtype=np.int64)
        reset = np.zeros(self.rows, dtype=bool)
        for row, position in enumerate(self.positions):
            epoch, index, offset = position
            doc = self.corpus.document(int(self.documents_of(row, epoch)[index]))
            reset[row] = offset == 0
            take = min(length, len(doc) - offset)
            inputs[row, :take] = doc[offset : offset + take]
            labels[row, : take - 1] = doc[offset + 1 : offset + take]
            if offset + take < len(doc):
                labels[row, take - 1] = doc[offset + take]
                position[2] = offset + take
                continue
            # the document ended in this window (its last token has no label): move to the next one
            index += 1
            if index == len(self.documents_of(row, epoch)):
                epoch, index = epoch + 1, 0
            position[:] = [epoch, index, 0]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(reset))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "stream", "row_offset": self.row_offset, "total_rows": self.total_rows,
                "positions": [list(p) for p in self.positions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        positions = state.get("positions")
        if state.get("mode") != "stream" or not isinstance(positions, list) or len(positions) != self.rows:
            raise ValueError(f"data state does not fit {self.rows} streaming rows: {str(state)[:200]}")
        for row, position in enumerate(positions):
            self._check_position(row, position)
        self.positions = [list(p) for p in positions]

    def _check_position(self, row: int, position: Any) -> None:
        """A saved [epoch, index, offset] that points inside this corpus (a damaged or foreign one does not)."""
        where = f"data position of row {self.row_offset + row} ({position!r})"
        if (not isinstance(position, list) or len(position) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in position)):
            raise ValueError(f"{where} must be three ints >= 0: epoch, document index, token offset")
        epoch, index, offset = position
        documents = self.documents_of(row, epoch)
        if index >= len(documents) or offset >= len(self.corpus.document(int(documents[index]))):
            raise ValueError(f"{where} lies past the end of the data: the documents changed since it was saved")


class RandomCrops:
    """Random windows of the packed training tokens, as in the reference's enwik8 example.

    Row g's window at step s is drawn from ``numpy.random.default_rng([seed, s, g])``: the step is the
    whole data position. Every row is reset every step (no state carried between steps).
    """

    def __init__(self, corpus: TokenCorpus, rows: int, *, row_offset: int = 0, total_rows: int | None = None,
                 seed: int = 0, ignore_index: int = -100):
        total_rows = rows if total_rows is None else total_rows
        _check_rows(rows, row_offset, total_rows)
        self.corpus, self.rows, self.row_offset, self.seed = corpus, rows, row_offset, seed
        self.total_rows = total_rows
        self.step = 0

    def next_batch(self, length: int) -> Batch:
        tokens = self.corpus.tokens
        if len(tokens) < length + 1:
            raise ValueError(f"data: crop mode needs more than {length} training tokens, the corpus has {len(tokens)}")
        windows = []
        for row in range(self.rows):
            rng = np.random.default_rng([self.seed, self.step, self.row_offset + row])
            start = int(rng.integers(0, len(tokens) - length))
            windows.append(tokens[start : start + length + 1].astype(np.int64))
        self.step += 1
        window = torch.from_numpy(np.stack(windows))  # (R, L + 1)
        return Batch(window[:, :-1], window[:, 1:], torch.ones(self.rows, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "crop", "row_offset": self.row_offset, "total_rows": self.total_rows, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = state.get("step")
        if state.get("mode") != "crop" or isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"data state is not a crop-mode state (a step >= 0): {str(state)[:200]}")
        self.step = state["step"]


BATCHERS = {"stream": DocumentStreams, "crop": RandomCrops}
