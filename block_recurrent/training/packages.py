"""Long documents from folders: every package (a folder at a chosen depth) becomes one document, its files
concatenated, held out by package.

The paper's GitHub corpus concatenates all the files of a repository into one document, so that a name defined in
one file is used thousands of lines later. The standard library holds such documents: its packages (``email/``,
``asyncio/``, the test suite's sub-packages, ...) are 10 KB to 1.4 MB each, where its files are about 15 KB.

- A package is a folder at ``depth`` below the data root (1: its top-level folders); its document holds every file
  under it, sorted by path, each preceded by ``FILE_SEPARATOR``, its path and a newline. The document's name is the
  folder's path (``"email"``, ``"test/test_asyncio"``).
- Files outside every package (less deep than ``depth``: the standard library's top-level modules) are left out.
- Folders named in ``nested`` hold packages one level deeper: the standard library's ``test/`` is a folder of
  test packages (``test/test_asyncio``), whose loose test files are modules of their own and are left out too.
- Held out by package: a package is held out when ``zlib.crc32(name) % 100 < PACKAGE_VALIDATION_PERCENT``; with
  the built-in corpus on CPython 3.11 that is 14 packages of 63 (1.93 MB of 12.99 MB, 1 KB to 757 KB each).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

from ..model.checks import check_choice, check_int
from .data import (
    Document, builtin_documents, hf_documents, path_documents, split_documents,
)

# what starts every file of a package's document: the ASCII file separator, then the file's path and a newline
FILE_SEPARATOR = "\x1c"
# packages held out; more than files' 5%, since packages are few (63 in the standard library)
PACKAGE_VALIDATION_PERCENT = 15
# the standard library's folders of packages
BUILTIN_NESTED = ("test",)
# how a corpus is cut into documents (TrainConfig.documents, brt train/eval --documents)
DOCUMENT_KINDS = ("file", "package")


def package_of(name: str, depth: int, nested: Sequence[str] = ()) -> str | None:
    """The package of the file at path ``name`` (relative, ``/`` separators): its first ``depth`` folders (one more
    under a folder in ``nested``), or None when the file lies less deep than that."""
    folders = name.split("/")[:-1]
    if folders and folders[0] in nested:
        depth += 1
    return "/".join(folders[:depth]) if len(folders) >= depth else None


def group_packages(documents: Sequence[Document], depth: int = 1, nested: Sequence[str] = ()) -> list[Document]:
    """One document per package (see the module docstring), sorted by name; files outside every package are left
    out. Deterministic: the same files give the same documents, whatever order they come in."""
    check_int("package_depth", depth, 1)
    packages: dict[str, list[Document]] = {}
    for document in documents:
        package = package_of(document.name, depth, nested)
        if package is not None:
            packages.setdefault(package, []).append(document)
    return [
        Document(package, "".join(f"{FILE_SEPARATOR}{d.name}\n{d.text}" for d in sorted(files, key=lambda d: d.name)))
        for package, files in sorted(packages.items())
    ]


def split_packages(packages: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """The fixed split of package documents: held out by crc32 of the package's name, at PACKAGE_VALIDATION_PERCENT
    (a split that would leave a side empty moves one package over, as :func:`split_documents` does)."""
    if len(packages) < 2:
        raise ValueError(f"data: {len(packages)} package(s) cannot be split into training and held-out packages; "
                         "give a folder with two packages or more, or a smaller package_depth")
    return split_documents(packages, percent=PACKAGE_VALIDATION_PERCENT)


def source_documents(
    data: str | None = None, *, hf_dataset: str | None = None, hf_split: str = "train", text_field: str = "text",
    documents: str = "file", package_depth: int = 1,
) -> list[Document]:
    """The documents of one source (``data``, ``hf_dataset``, or neither: the built-in corpus), as files or, with
    ``documents="package"``, as packages at ``package_depth``."""
    check_choice("documents", documents, DOCUMENT_KINDS)
    check_int("package_depth", package_depth, 1)
    if data is not None and hf_dataset is not None:
        raise ValueError("give either data (a path) or hf_dataset (a dataset name), not both")
    if hf_dataset is not None:
        if documents == "package":
            raise ValueError("documents='package' groups the files of folders; a Hugging Face dataset's rows have "
                             "none (use documents='file')")
        return hf_documents(hf_dataset, hf_split, text_field)
    files = builtin_documents() if data is None else path_documents(data)
    if documents == "file" or (data is not None and Path(data).is_file()):  # a file is one document either way
        return files
    packages = group_packages(files, package_depth, BUILTIN_NESTED if data is None else ())
    if not packages:
        raise ValueError(f"data: {data} holds no folder at package_depth={package_depth} (its files lie less deep); "
                         "give a smaller package_depth or documents='file'")
    if data is not None:
        left_out = sum(package_of(d.name, package_depth) is None for d in files)
        if left_out:
            warnings.warn(f"data: left out {left_out} files of {data} that lie in no folder at "
                          f"package_depth={package_depth}", stacklevel=2)
    return packages


def split_source(documents: Sequence[Document], kind: str = "file") -> tuple[list[Document], list[Document]]:
    """The fixed train/held-out split of a source's documents: by file (:func:`split_documents`) or by package."""
    check_choice("documents", kind, DOCUMENT_KINDS)
    return split_packages(documents) if kind == "package" else split_documents(documents)


# the lengths of a split's documents, reported beside a run


def length_distribution(documents: Sequence[Document]) -> dict:
    """Bytes per document: count, total, min, median, mean, max, and the documents and bytes per log-spaced bucket
    of lengths (``buckets``: (low, high, documents, bytes) for lengths in [low, high), powers of 4 from 1 KB)."""
    if not documents:
        raise ValueError("documents must be a non-empty list")
    sizes = sorted(len(d.text.encode("utf-8")) for d in documents)
    edges = [0] + [1024 * 4**i for i in range(int(math.log(max(sizes[-1], 1024) / 1024, 4)) + 2)]
    buckets = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = [s for s in sizes if low <= s < high]
        buckets.append((low, high, len(inside), sum(inside)))
    middle = len(sizes) // 2
    median = sizes[middle] if len(sizes) % 2 else (sizes[middle - 1] + sizes[middle]) / 2
    return {"documents": len(sizes), "bytes": sum(sizes), "min": sizes[0], "median": median,
            "mean": sum(sizes) / len(sizes), "max": sizes[-1], "buckets": buckets}


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB" if n >= 1024 else f"{n:.0f} B"


def format_lengths(splits: dict[str, Sequence[Document]]) -> str:
    """Markdown tables of :func:`length_distribution` for named splits (``{"train": ..., "held out": ...}``)."""
    stats = {name: length_distribution(docs) for name, docs in splits.items()}
    lines = ["| split | documents | bytes | min | median | mean | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['documents']} | {_size(s['bytes'])} | {_size(s['min'])} | {_size(s['median'])} | "
                     f"{_size(s['mean'])} | {_size(s['max'])} |")
    edges = max((s["buckets"] for s in stats.values()), key=len)
    lines += ["", "| length | " + " | ".join(f"{name}: documents (bytes)" for name in stats) + " |",
              "|---|" + "---:|" * len(stats)]
    for i, (low, high, _, _) in enumerate(edges):
        cells = []
        for s in stats.values():
            n, b = (s["buckets"][i][2], s["buckets"][i][3]) if i < len(s["buckets"]) else (0, 0)
            cells.append(f"{n} ({_size(b)})" if n else "-")
        lines.append(f"| {_size(low)}-{_size(high)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
