"""Data: document streams against a naive reference, epoch coverage, resets, splits, sources, bad input."""

import gzip
import zlib

import numpy as np
import pytest
import torch

from block_recurrent.training.data import (
    VALIDATION_PERCENT, ByteTokenizer, Document, DocumentStreams, RandomCrops, TokenCorpus, builtin_documents,
    load_documents, load_tokenizer, path_documents, split_documents,
)

IGNORE = -100


def unique_corpus(lengths):
    """Documents whose tokens are 1, 2, 3, ... in reading order: every token says where it came from."""
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.int64)
    return TokenCorpus([f"doc{i}" for i in range(len(lengths))], tokens, offsets, int(offsets[-1]))


def naive_windows(corpus, row_docs, length):
    """The windows one row should see: each document cut into windows, the last one padded."""
    for index in row_docs:
        doc = corpus.document(int(index)).tolist()
        for start in range(0, len(doc), length):
            chunk = doc[start : start + length]
            labels = doc[start + 1 : start + length + 1]
            yield (chunk + [0] * (length - len(chunk)), labels + [IGNORE] * (length - len(labels)), start == 0)


def test_streams_match_a_naive_reference_and_reset_exactly_at_document_starts():
    corpus = unique_corpus([3, 17, 8, 1, 40, 9, 12, 5, 7])
    rows, length = 3, 6
    streams = DocumentStreams(corpus, rows, seed=4, ignore_index=IGNORE)
    expected = []
    for row in range(rows):
        docs = list(streams.documents_of(row, 0)) + list(streams.documents_of(row, 1))
        expected.append(list(naive_windows(corpus, docs, length)))
    steps = min(len(e) for e in expected)
    for step in range(steps):
        batch = streams.next_batch(length)
        for row in range(rows):
            inputs, labels, reset = expected[row][step]
            assert batch.inputs[row].tolist() == inputs
            assert batch.labels[row].tolist() == labels
            assert bool(batch.reset[row]) == reset


def test_an_epoch_of_streams_reads_every_token_once():
    lengths = [3, 17, 8, 1, 40, 9, 12, 5, 7, 2, 30]
    corpus = unique_corpus(lengths)
    streams = DocumentStreams(corpus, 4, seed=1, ignore_index=IGNORE)
    starts = set(corpus.offsets[:-1] + 1)  # the first token id of every document
    seen_inputs, seen_labels = [], []
    while min(p[0] for p in streams.positions) == 0:
        epochs = [p[0] for p in streams.positions]
        batch = streams.next_batch(5)
        for row, epoch in enumerate(epochs):
            if epoch:
                continue
            real = batch.inputs[row][batch.inputs[row] > 0].tolist()
            seen_inputs += real
            seen_labels += [x for x in batch.labels[row].tolist() if x != IGNORE]
            # a row is reset exactly when its window starts a document
            assert bool(batch.reset[row]) == (real[0] in starts)
    assert sorted(seen_inputs) == list(range(1, sum(lengths) + 1))
    # every token but each document's first is predicted once
    assert sorted(seen_labels) == sorted(set(range(1, sum(lengths) + 1)) - starts)


def test_rows_split_across_ranks_equal_one_stream_of_all_rows():
    corpus = unique_corpus([5, 9, 14, 3, 22, 8, 6, 11])
    whole = DocumentStreams(corpus, 4, seed=2)
    parts = [DocumentStreams(corpus, 2, row_offset=2 * k, total_rows=4, seed=2) for k in range(2)]
    for _ in range(12):
        batch = whole.next_batch(4)
        halves = [p.next_batch(4) for p in parts]
        assert torch.equal(batch.inputs, torch.cat([h.inputs for h in halves]))
        assert torch.equal(batch.labels, torch.cat([h.labels for h in halves]))
        assert torch.equal(batch.reset, torch.cat([h.reset for h in halves]))


@pytest.mark.parametrize("kind", [DocumentStreams, RandomCrops])
def test_a_restored_position_continues_identically(kind):
    corpus = unique_corpus([50, 31, 77, 12, 64])
    first = kind(corpus, 3, seed=5)
    for _ in range(7):
        first.next_batch(8)
    second = kind(corpus, 3, seed=5)
    second.load_state_dict(first.state_dict())
    for _ in range(5):
        a, b = first.next_batch(8), second.next_batch(8)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) and torch.equal(a.reset, b.reset)


def test_more_rows_than_documents_cuts_documents():
    corpus = unique_corpus([40, 30])
    streams = DocumentStreams(corpus, 5)
    assert len(streams.corpus) >= 5
    assert streams.corpus.token_count == 70


def test_random_crops_are_shifted_windows_reset_every_step():
    corpus = unique_corpus([100, 60])
    crops = RandomCrops(corpus, 4, seed=3)
    batch = crops.next_batch(10)
    assert batch.reset.all()
    assert torch.equal(batch.labels[:, :-1], batch.inputs[:, 1:])
    assert torch.equal(batch.labels[:, -1], batch.inputs[:, -1] + 1)  # ids are consecutive
    again = RandomCrops(corpus, 2, row_offset=2, total_rows=4, seed=3).next_batch(10)
    assert torch.equal(again.inputs, batch.inputs[2:])


def test_builtin_corpus_split_is_the_documented_crc32_rule():
    documents = builtin_documents()
    assert len(documents) > 100 and all(d.name.endswith(".py") for d in documents)
    assert "site-packages" not in " ".join(d.name for d in documents)
    train, val = split_documents(documents)
    assert {d.name for d in val} == {d.name for d in documents if zlib.crc32(d.name.encode()) % 100 < VALIDATION_PERCENT}
    assert len(train) + len(val) == len(documents)
    assert 0.02 < len(val) / len(documents) < 0.10


def test_single_document_holds_out_its_tail():
    text = "abcdefghij" * 100
    train, val = split_documents([Document("book.txt", text)])
    assert train[0].text + val[0].text == text
    assert len(val[0].text) == len(text) * VALIDATION_PERCENT // 100


def test_files_folders_and_gz(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("héllo\n")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("zipped text\n".encode()))
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))  # not text: skipped in a folder
    (tmp_path / ".hidden").write_text("secret")
    with pytest.warns(UserWarning, match="skipped 1 non-text"):
        documents = path_documents(tmp_path)
    assert {d.name: d.text for d in documents} == {"a.txt": "hello world\n", "c.txt.gz": "zipped text\n",
                                                     "sub/b.md": "héllo\n"}
    assert path_documents(tmp_path / "c.txt.gz")[0].text == "zipped text\n"
    corpus = TokenCorpus.from_documents(documents, ByteTokenizer())
    assert corpus.num_bytes == corpus.token_count == len("hello world\nzipped text\nhéllo\n".encode())


def test_bad_data_paths_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        path_documents(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        path_documents(tmp_path / "empty.txt")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02\xff")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        path_documents(tmp_path / "blob.bin")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        path_documents(tmp_path / "broken.gz")
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(ValueError, match="holds no non-empty text files"):
        path_documents(folder)
    with pytest.raises(ValueError, match="not both"):
        load_documents(str(tmp_path), hf_dataset="some/name")
    with pytest.raises(ValueError, match="rows"):
        DocumentStreams(unique_corpus([5]), 0)


def test_byte_tokenizer_round_trip():
    tokenizer = load_tokenizer(None)
    text = "def f(x):\n    return 'ü' * x\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode())
    assert tokenizer.decode(ids.tolist()) == text


def write_bpe(path, texts, vocab_size=300):
    """A small byte-level BPE tokenizer file, trained here (nothing downloaded)."""
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(texts, trainer)
    model.save(str(path))
    return path


def test_tokenizers_file(tmp_path):
    path = write_bpe(tmp_path / "tok.json", ["def function(argument):\n    return argument\n"] * 50)
    tokenizer = load_tokenizer(path)
    assert 256 < tokenizer.vocab_size <= 300
    ids = tokenizer.encode("def function(x):")
    assert len(ids) < len("def function(x):")
    assert tokenizer.decode(ids.tolist()) == "def function(x):"
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


def test_local_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["first document", "", "second document"], "id": [1, 2, 3]})
    data.save_to_disk(str(tmp_path / "ds"))
    documents = load_documents(hf_dataset=str(tmp_path / "ds"))
    assert [d.text for d in documents] == ["first document", "second document"]
    with pytest.raises(ValueError, match="text_field"):
        load_documents(hf_dataset=str(tmp_path / "ds"), text_field="body")
