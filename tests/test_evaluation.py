"""Streaming evaluation: equals the trainer wrapper's loss, does not depend on the segment length, and keeps
memory constant however many segments a document has."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from block_recurrent import RecurrentTrainerWrapper
from block_recurrent.inference.evaluation import EvalResult, curve_range, evaluate, evaluate_documents, position_curve

from conftest import TINY, make_model, random_tokens

W, N = TINY["block_width"], TINY["max_seq_len"]  # 4, 16


def eval_model(dtype=torch.float64, **overrides):
    """A tiny model in eval mode, dropout-free, so that every pass is deterministic."""
    model = make_model(dtype, **overrides).eval()
    assert not model.training and model.config.attn_dropout == 0 and model.config.ff_dropout == 0
    return model


def naive_losses(model, tokens):
    """Per-token losses (B, T - 1) from one pass over the whole text: the specification."""
    with torch.no_grad():
        logits, _ = model.run(tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def test_matches_the_wrapper_loss():
    model = eval_model(use_compressed_mem=True)
    text = random_tokens(2, 3 * N + 1)
    wrapper = RecurrentTrainerWrapper(model).eval()
    with torch.no_grad():
        expected = wrapper(text).item()
    result = evaluate(model, text)
    assert result.tokens == 2 * 3 * N
    assert result.loss == pytest.approx(expected, rel=0, abs=1e-12)
    assert result.loss_sum == pytest.approx(expected * result.tokens, rel=1e-12)


@pytest.mark.parametrize("segment_len", [W, 2 * W, N, 3 * N])
def test_independent_of_segment_length_and_equal_to_one_pass(segment_len):
    model = eval_model(recurrent_layers=(3,), read_recurrent_layers=(1,))
    text = random_tokens(2, 2 * N + 7)  # a ragged last segment
    result = evaluate(model, text, segment_len=segment_len, bucket_size=5)
    losses = naive_losses(model, text)  # (2, 2N + 6)
    assert result.loss_sum == pytest.approx(losses.sum().item(), rel=1e-12)
    # buckets of prediction positions, rows pooled
    assert len(result.bucket_losses) == math.ceil(losses.shape[1] / 5)
    for start, mean, count in result.bucket_losses:
        chunk = losses[:, start : start + 5]
        assert count == chunk.numel()
        assert mean == pytest.approx(chunk.mean().item(), rel=1e-12)


def test_bits_and_one_document_form():
    model = eval_model()
    doc = random_tokens(1, N + 3)[0]
    result = evaluate(model, doc, bytes_per_token=2.0)
    assert isinstance(result, EvalResult) and result.bucket_losses is None
    assert result == evaluate(model, doc[None], bytes_per_token=2.0)
    assert result.bits_per_token == pytest.approx(result.loss / math.log(2))
    assert result.bits_per_byte == pytest.approx(result.bits_per_token / 2.0)


def test_carried_state_continues_the_document():
    model = eval_model()
    text = random_tokens(2, 2 * N + 5)
    cut = N + W  # a block boundary
    with torch.no_grad():
        _, state = model.run(text[:, :cut])
    first = evaluate(model, text[:, : cut + 1])
    rest = evaluate(model, text[:, cut:], state=state)
    assert first.loss_sum + rest.loss_sum == pytest.approx(evaluate(model, text).loss_sum, rel=1e-12)
    assert rest.loss_sum != pytest.approx(evaluate(model, text[:, cut:]).loss_sum, rel=1e-6)  # the state matters


def test_restores_training_mode():
    model = eval_model()
    model.train()
    evaluate(model, random_tokens(1, 9))
    assert model.training


# constant memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by operators while active and still referenced.

    Storages that existed before (parameters, buffers, the input tokens) are not counted, even through views.
    """

    def __init__(self, exclude):
        super().__init__()
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs = {}  # storage data_ptr -> number of live tensors on it
        self.sizes = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in self.excluded or size == 0:
            return
        if ptr not in self.refs:
            self.refs[ptr], self.sizes[ptr] = 0, size
            self.current += size
            self.peak = max(self.peak, self.current)
        self.refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.current -= self.sizes.pop(ptr)


def peak_bytes(model, tokens, fn):
    meter = LiveTensorBytes([*model.parameters(), *model.buffers(), tokens])
    with meter:
        fn(model, tokens)
    return meter.peak


def keep_all_logits(model, tokens):
    """A non-streaming evaluation: one pass, every logit alive at once."""
    with torch.no_grad():
        logits, _ = model.run(tokens[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).item()


def test_memory_does_not_grow_with_the_number_of_segments():
    model = eval_model(num_tokens=256, block_width=N)  # one block per segment keeps the metered run short
    short, long = random_tokens(2, 2 * N + 1, 256), random_tokens(2, 16 * N + 1, 256)
    logits_per_segment = 2 * N * 256 * 8  # (B, N, V) float64
    one_block = lambda model, tokens: evaluate(model, tokens, segment_len=N)  # the default takes up to 1,024 tokens
    growth = peak_bytes(model, long, one_block) - peak_bytes(model, short, one_block)
    assert growth < logits_per_segment / 2
    # the meter sees the difference: keeping every logit grows by at least the 14 extra segments' logits
    naive_growth = peak_bytes(model, long, keep_all_logits) - peak_bytes(model, short, keep_all_logits)
    assert naive_growth > 14 * logits_per_segment


def test_bad_inputs_raise_clear_errors():
    model = eval_model()
    text = random_tokens(2, 9)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(model, text[:, :1])
    with pytest.raises(ValueError, match="tokens"):
        evaluate(model, text[:, :0])
    with pytest.raises(ValueError, match=r"allowed range is \[0, 31\]"):
        evaluate(model, torch.tensor([3, 40, 1]))
    with pytest.raises(TypeError, match="tokens"):
        evaluate(model, text.float())
    with pytest.raises(ValueError, match="segment_len must be a multiple of block_width=4"):
        evaluate(model, text, segment_len=6)
    with pytest.raises(ValueError, match="segment_len"):
        evaluate(model, text, segment_len=0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        evaluate(model, text, bytes_per_token=0.0)
    with pytest.raises(ValueError, match="bucket_size"):
        evaluate(model, text, bucket_size=0)
    with torch.no_grad():
        _, state3 = model.run(random_tokens(3, W))
    with pytest.raises(ValueError, match="batch size"):
        evaluate(model, text, state=state3)
    with pytest.raises(TypeError, match="model"):
        evaluate(RecurrentTrainerWrapper(model), text)


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(use_compressed_mem=True, compressed_mem_factor=2),
     dict(attention_window="sliding", position_encoding="t5", t5_num_buckets=8, t5_max_distance=16),
     dict(state_feedback=True, gate="lstm"), dict(recurrent_layers=())],
)
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_documents_side_by_side_equal_each_document_alone(variant, batch_size):
    """Ragged documents in lanes (reset where each starts, padded to whole segments) score as if alone."""
    model = eval_model(**variant)
    lengths = [2, W - 1, W + 1, N, N + 1, 3 * N + 5, 2 * N + 2]  # shorter than, equal to and longer than a block/segment
    documents = [random_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    results = evaluate_documents(model, documents, batch_size=batch_size, bucket_size=5)
    assert len(results) == len(documents)
    listed = evaluate(model, documents, bucket_size=5)  # a list given to evaluate goes the same way
    assert [r.loss_sum for r in listed] == pytest.approx([r.loss_sum for r in results], rel=1e-10, abs=1e-10)
    for document, result in zip(documents, results):
        alone = evaluate(model, document, bucket_size=5)
        assert result.tokens == alone.tokens == len(document) - 1
        assert result.loss_sum == pytest.approx(alone.loss_sum, rel=1e-10, abs=1e-10)
        for (start, loss, count), (start2, loss2, count2) in zip(result.bucket_losses, alone.bucket_losses):
            assert (start, count) == (start2, count2) and loss == pytest.approx(loss2, rel=1e-10, abs=1e-10)


def test_documents_side_by_side_detect_a_leak():
    """The check above can fail: without the reset, a lane's second document sees the first one's memory."""
    model = eval_model()
    documents = [random_tokens(1, N + 1, seed=1)[0], random_tokens(1, N + 1, seed=2)[0]]
    together = evaluate_documents(model, documents, batch_size=1)
    with torch.no_grad():
        _, state = model.run(documents[0][None, :-1])
    leaked = evaluate(model, documents[1], state=state)
    assert together[1].loss_sum != pytest.approx(leaked.loss_sum, rel=1e-6)
    assert together[1].loss_sum == pytest.approx(evaluate(model, documents[1]).loss_sum, rel=1e-10)


def test_documents_input_checks():
    model = eval_model()
    with pytest.raises(TypeError, match="documents"):
        evaluate_documents(model, random_tokens(2, 5))
    with pytest.raises(ValueError, match="1-D"):
        evaluate_documents(model, [random_tokens(2, 5)])
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_documents(model, [random_tokens(1, 1)[0]])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_documents(model, [random_tokens(1, 5)[0]], batch_size=0)


def test_position_curve_pools_documents_by_position():
    """The pooled curve is the specification's per-position losses of every document, bucketed by position and
    averaged over documents; a range over all of it is the whole score."""
    model = eval_model()
    docs = [random_tokens(1, length)[0] for length in (3 * N + 1, N + 5, 2 * N)]
    bucket = 8
    results = evaluate_documents(model, docs, batch_size=2, bucket_size=bucket)
    curve = position_curve(results, bytes_per_token=2.0)

    pooled = {}
    for doc in docs:
        losses = naive_losses(model, doc[None])[0]
        for position, loss in enumerate(losses.tolist()):
            start = position // bucket * bucket
            pooled.setdefault(start, []).append(loss)
    assert [start for start, _, _ in curve] == sorted(pooled)
    for start, bits, count in curve:
        assert count == len(pooled[start])
        assert bits == pytest.approx(sum(pooled[start]) / count / math.log(2) / 2.0, rel=1e-9)

    whole = sum(r.loss_sum for r in results) / sum(r.tokens for r in results) / math.log(2) / 2.0
    bits, count = curve_range(curve, 0)
    assert (bits, count) == (pytest.approx(whole, rel=1e-9), sum(r.tokens for r in results))
    bits, count = curve_range(curve, bucket, 3 * bucket)  # buckets starting at 8 and 16
    assert count == len(pooled[8]) + len(pooled[16])
    assert bits == pytest.approx((sum(pooled[8]) + sum(pooled[16])) / count / math.log(2) / 2.0, rel=1e-9)
    assert math.isnan(curve_range(curve, 10_000)[0])
    with pytest.raises(ValueError, match="bucket_size"):
        position_curve(evaluate_documents(model, docs))
