"""The lengths of the documents of both splits: files or packages of the built-in corpus, or of a folder.

    python experiments/document_lengths.py --documents package        # the built-in corpus's packages
    python experiments/document_lengths.py --data DIR --documents package --package-depth 2

The record: docs/experiments/2026-12-05-long-documents.md. Prints markdown tables (count, bytes, min, median,
mean, max per split; documents and bytes per length bucket) and the held-out documents by name.
"""

from __future__ import annotations

import argparse

from block_recurrent.training.packages import format_lengths, source_documents, split_source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a text file or folder instead of the built-in corpus")
    parser.add_argument("--documents", choices=("file", "package"), default="package")
    parser.add_argument("--package-depth", type=int, default=1)
    args = parser.parse_args(argv)
    documents = source_documents(args.data, documents=args.documents, package_depth=args.package_depth)
    train, held_out = split_source(documents, args.documents)
    print(format_lengths({"train": train, "held out": held_out}))
    if len(held_out) <= 40:
        print("\nheld out: " + ", ".join(f"{d.name} ({len(d.text.encode('utf-8')) / 1024:.0f} KB)"
                                         for d in sorted(held_out, key=lambda d: -len(d.text))))


if __name__ == "__main__":
    main()
