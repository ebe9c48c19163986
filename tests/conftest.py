"""Shared test helpers: tiny models built deterministically, in float64 where rounding could hide a bug."""

import shutil
import signal

import pytest
import torch

from block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from block_recurrent.cli import main

TINY = dict(
    num_tokens=32, dim=32, depth=3, dim_head=8, heads=2, max_seq_len=16, block_width=4,
    num_state_vectors=3, recurrent_layers=(2,),
)


# torch.compile on the CPU builds C++ kernels: without a compiler (inductor looks for g++) those tests cannot run
HAS_CPP_COMPILER = shutil.which("g++") is not None
needs_cpp_compiler = pytest.mark.skipif(not HAS_CPP_COMPILER, reason="torch.compile on the CPU needs a C++ compiler (g++)")


def make_model(dtype=torch.float64, seed=0, **overrides) -> BlockRecurrentTransformer:
    torch.manual_seed(seed)
    model = BlockRecurrentTransformer(BlockRecurrentConfig(**{**TINY, **overrides}))
    return model.to(dtype).eval()


def random_tokens(batch, length, num_tokens=TINY["num_tokens"], seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens, (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads' waits can
    make them 10x slower; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return make_model()


def interruptible() -> None:
    """Popen's preexec_fn for a child that must take Ctrl-C: a shell without job control starts background
    commands (CI runners among them) with SIGINT ignored, and a Python child inherits that and keeps it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_handled():
    """SIGINT raising KeyboardInterrupt in this process, as in a terminal, whatever this process inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# the command line on a tiny corpus (tests/test_cli.py, tests/test_run_files.py)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(8):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i))
    return folder


def brt(*argv):
    return main([str(a) for a in argv])


def tiny_run(corpus, run, *extra):
    return ("train", "--preset", "tiny", "--data", corpus, "--out-dir", run, "--batch-size", 2, "--warmup-steps", 1,
            "--log-every", 1, "--no-progress", "--eval-tokens", 200, "--sample-tokens", 5, *extra)
