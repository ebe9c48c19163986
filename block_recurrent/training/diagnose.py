"""``brt inspect`` and ``brt eval --ablate / --positions``: the diagnostics of
:mod:`block_recurrent.inference.diagnostics` on a checkpoint, from the command line.

    brt inspect --checkpoint runs/brt                                   # the gates' keep values, half-lives
    brt eval --checkpoint runs/brt --documents package --ablate state memory --positions

The parsers and the command functions live here so that ``block_recurrent.cli`` only registers them; everything
heavy is imported inside the functions (importing this module loads no trainer).
"""

from __future__ import annotations

import argparse
from typing import Callable

from ..model.checks import check_int

DROPS = ("state", "memory", "both")
INSPECT_TOKENS = 65536  # held-out tokens an LSTM gate's keep values are averaged over
GRADIENT_WARMUP = 8  # blocks each --state-gradient window runs without gradient first, so its state is a written one


def add_document_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--documents", choices=("file", "package"), default="file",
                        help="file: every file is a document; package: every folder at --package-depth is one "
                             "(the built-in corpus's held-out packages without --data)")
    parser.add_argument("--package-depth", type=int, default=1, help="with --documents package (default: 1)")


def add_eval_diagnostics(evaluate: argparse.ArgumentParser) -> None:
    """``brt eval``'s diagnostics: what the carried state and memory contribute, and the per-position curve."""
    group = evaluate.add_argument_group("diagnostics (block_recurrent.inference.diagnostics)")
    group.add_argument("--ablate", nargs="+", choices=DROPS, default=None,
                       help="also score with what is carried dropped after every block: state (every block reads "
                            "the learned initial state), memory (no block sees the previous one), both; with --task, "
                            "the task's exact match on the same examples")
    group.add_argument("--positions", action="store_true",
                       help="print bits per byte by position in the document, in log-spaced ranges to 1 MB")


def add_inspect_command(commands) -> None:
    """Register ``brt inspect`` on the ``brt`` subparsers."""
    inspect = commands.add_parser("inspect", help="a checkpoint's recurrent gates: keep values and half-lives")
    inspect.add_argument("--checkpoint", required=True, help="run folder, step folder or save_pretrained folder")
    inspect.add_argument("--data", default=None,
                         help="text file, .gz or folder an LSTM gate's keep is averaged over; default: the built-in "
                              "corpus's held-out documents")
    add_document_options(inspect)
    inspect.add_argument("--max-tokens", type=int, default=INSPECT_TOKENS,
                         help=f"tokens of those documents to run, the first max-tokens / documents of each "
                             f"(default: {INSPECT_TOKENS})")
    inspect.add_argument("--batch-size", type=int, default=16, help="documents side by side (default: 16)")
    inspect.add_argument("--state-gradient", type=int, default=None, metavar="SPAN",
                         help="also print how much of a block's loss gradient reaches the state 0 to SPAN - 1 "
                              "blocks before it, over windows of those documents (as a segment of SPAN blocks "
                              "trains it): through every path, and through the state's own updates alone")
    inspect.add_argument("--gradient-windows", type=int, default=64,
                         help=f"windows of {GRADIENT_WARMUP} + SPAN blocks --state-gradient averages over "
                              "(default: 64)")
    inspect.add_argument("--device", default="auto")


def load_documents_for(args: argparse.Namespace):
    """The documents ``brt eval`` and ``brt inspect`` score: ``--data`` whole, else the built-in corpus's held out
    files or packages."""
    from .packages import source_documents, split_source

    documents = source_documents(args.data, documents=args.documents, package_depth=args.package_depth)
    return split_source(documents, args.documents)[1] if args.data is None else documents


def _token_documents(model, corpus, max_tokens: int | None, spread: bool = False) -> list:
    """The corpus's documents as token tensors on the model's device (see
    :func:`~.validation.take_documents`)."""
    import torch

    from .validation import take_documents

    return [torch.from_numpy(doc.astype("int64")).to(model.device)
            for doc in take_documents(corpus, max_tokens, spread)]


def run_eval_diagnostics(args: argparse.Namespace, model, corpus, autocast) -> int:
    """Score the corpus as carried, and with each ``--ablate`` drop; print the whole score and, with
    ``--positions`` (or any ablation), the log-spaced per-position table."""
    from ..inference.diagnostics import evaluate_ablated, format_curves, log_curve, whole

    docs = _token_documents(model, corpus, args.max_tokens)
    rows = {}
    for drop in [None, *(args.ablate or [])]:
        with autocast:
            results = evaluate_ablated(model, docs, drop, batch_size=args.batch_size,
                                       bytes_per_token=corpus.bytes_per_token, bucket_size=1024)
        name = "carried (as trained)" if drop is None else f"{drop} dropped after every block"
        per_token = corpus.bytes_per_token
        rows[name] = (whole(results, per_token), log_curve(results, bytes_per_token=per_token))
    print(f"bits per byte over {sum(len(d) for d in docs)} tokens of {len(docs)} documents, whole and by position:\n")
    print(format_curves(rows))
    return 0


def run_inspect(args: argparse.Namespace, load: Callable) -> int:
    """Print the checkpoint's model and the keep values of its gates (an LSTM gate's over held-out text), and with
    ``--state-gradient`` the gradient reaching its states across blocks."""
    from ..inference.diagnostics import format_keep, format_state_gradients, keep_values, state_gradients
    from .data import TokenCorpus

    check_int("--max-tokens", args.max_tokens, 2)
    check_int("--batch-size", args.batch_size, 1)
    if args.state_gradient is not None:
        check_int("--state-gradient", args.state_gradient, 1)
        check_int("--gradient-windows", args.gradient_windows, 1)
    model, tokenizer = load(args.checkpoint, args.device)
    c = model.config
    print(f"{args.checkpoint}: {model.num_parameters():,} parameters, width {c.dim}, {c.depth} layers, blocks of "
          f"{c.block_width}, segments of {c.max_seq_len}, recurrent layers {list(c.recurrent_layers)} with "
          f"{c.num_state_vectors} state vectors, " + ("a delta-rule memory (no gate)" if c.state_write == "delta"
                                                       else f"gate {c.gate!r}"))
    if not c.recurrent_layers:
        print("no recurrent layer: nothing is kept but the XL memory")
        return 0
    docs = None
    gated = c.state_write != "delta"  # a delta-rule memory has no gate: no keep values to show
    measured = gated and (c.gate == "lstm" or c.state_write == "slots")  # keeps that depend on what is written
    if measured or args.state_gradient is not None:
        corpus = TokenCorpus.from_documents(load_documents_for(args), tokenizer)
        docs = _token_documents(model, corpus, args.max_tokens, spread=True)
    if measured:
        gates = "LSTM gates'" if c.gate == "lstm" else "gates'"
        print(f"the {gates} keep values{' with the slot write' if c.state_write == 'slots' else ''} averaged over every "
              f"block of {sum(len(d) for d in docs)} tokens of {len(docs)} documents")
    if gated:
        print()
        print(format_keep(keep_values(model, docs if measured else None, batch_size=args.batch_size)))
    if args.state_gradient is not None:
        span, warmup = args.state_gradient, GRADIENT_WARMUP
        gradients = [g for through_memory in (True, False)
                     for g in state_gradients(model, docs, span=span, warmup=warmup,
                                              max_windows=args.gradient_windows, batch_size=args.batch_size,
                                              through_memory=through_memory)]
        windows = gradients[0].windows
        print(f"\nthe loss gradient of a block reaching the state d blocks before it, as a share of d = 0, the "
              f"windows' median share in brackets ({windows} windows of {warmup} + {span} blocks of those documents; "
              f"'state alone': the XL memory carries no gradient):\n")
        print(format_state_gradients(gradients))
    return 0
