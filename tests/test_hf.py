"""Hugging Face transformers integration on the tiny preset, offline: a brt checkpoint converted, loaded with the
Auto classes, generating token for token as ``block_recurrent.generate``, scoring as ``evaluate``, in a pipeline and
through lm-evaluation-harness's ``hf`` model."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

import block_recurrent.hf as brt_hf  # noqa: E402  (registers the model type with the Auto classes)
from block_recurrent import BlockRecurrentConfig, BlockRecurrentModel, evaluate, generate, save_pretrained  # noqa: E402
from block_recurrent.training.data import ByteTokenizer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(library model, transformers folder) of a tiny model with random weights (blocks of 32, max_seq_len 64)."""
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny")).eval()
    root = tmp_path_factory.mktemp("hf")
    save_pretrained(model, root / "checkpoint")
    return model, brt_hf.convert_checkpoint(root / "checkpoint", root / "hf")


@pytest.fixture(scope="module")
def loaded(converted):
    model, folder = converted
    return model, AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_the_converted_folder_loads_with_the_auto_classes(converted, loaded):
    model, folder = converted
    _, hf_model, tokenizer = loaded
    assert isinstance(hf_model, brt_hf.BlockRecurrentForCausalLM)
    library = hf_model.model.state_dict()
    assert library.keys() == model.state_dict().keys()
    # weights from the checkpoint, and the rotary tables (non-persistent buffers) computed again
    assert all(torch.equal(library[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(hf_model.model.buffers(), model.buffers()))
    text = "héllo wörld\n\tdef main():"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.padding_side == "left"


def test_remote_code_loads_it_without_importing_the_integration(converted, tmp_path):
    _, folder = converted
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            "ids = tokenizer('ab', return_tensors='pt').input_ids\n"
            "print(type(model).__name__, model.generate(ids, max_new_tokens=3, do_sample=False).shape[1])\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["BlockRecurrentForCausalLM", "5"]


def test_greedy_generate_equals_the_librarys_past_blocks_and_max_seq_len(loaded):
    model, hf_model, tokenizer = loaded
    prompt = tokenizer(["def main(", "import os"], return_tensors="pt")  # equal lengths: no padding
    assert bool(prompt.attention_mask.all())
    new = 150  # past several blocks of 32 and past max_seq_len = 64
    out = hf_model.generate(**prompt, max_new_tokens=new, do_sample=False)
    assert out.shape == (2, 9 + new)
    assert torch.equal(out[:, :9], prompt.input_ids)
    assert torch.equal(out[:, 9:], generate(model, prompt.input_ids, new, temperature=0))


def test_sampling_with_transformers_processors(loaded):
    model, hf_model, tokenizer = loaded
    ids = tokenizer("the quick", return_tensors="pt").input_ids
    options = dict(max_new_tokens=40, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1)
    first = hf_model.generate(ids, **options)
    torch.manual_seed(1)
    assert torch.equal(hf_model.generate(ids, **options), first)  # reproducible from the seed
    assert first.shape == (1, 9 + 40) and int(first.max()) < 256
    # the processors act on the model's scores: top_k=1 is greedy, a repetition penalty changes the greedy text
    greedy = generate(model, ids, 40, temperature=0)
    assert torch.equal(hf_model.generate(ids, max_new_tokens=40, do_sample=True, top_k=1)[:, 9:], greedy)
    penalised = hf_model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=5.0)[:, 9:]
    assert not torch.equal(penalised, greedy)


def test_beam_search_with_the_cache_equals_beam_search_without_it(loaded):
    """Beam search reorders the cache's rows (DecodeState.select_rows); without a cache every step reruns the
    whole text, the specification."""
    _, hf_model, tokenizer = loaded
    batch = tokenizer(["x", "import os\n" * 4], return_tensors="pt", padding=True)  # left padding too
    options = dict(max_new_tokens=40, do_sample=False, num_beams=3, num_return_sequences=2)  # 40: past a block
    cached = hf_model.generate(**batch, **options)
    uncached = hf_model.generate(**batch, use_cache=False, **options)
    assert cached.shape == (4, batch.input_ids.shape[1] + 40)
    assert torch.equal(cached, uncached)


def test_a_left_padded_batch_equals_each_row_alone(loaded):
    model, hf_model, tokenizer = loaded
    texts = ["x", "def main():\n    return 0  # thirty-three", "import os\n" * 7]  # 1, 33 and 70 bytes
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert not bool(batch.attention_mask.all())  # left padding
    out = hf_model.generate(**batch, max_new_tokens=50, do_sample=False)[:, batch.input_ids.shape[1]:]
    for row, text in zip(out, texts):
        alone = generate(model, torch.tensor(ByteTokenizer().encode(text), dtype=torch.long), 50, temperature=0)
        assert torch.equal(row, alone[0])
    # the library's own ragged path agrees too
    ragged = generate(model, [torch.tensor(ByteTokenizer().encode(t), dtype=torch.long) for t in texts], 50,
                      temperature=0)
    assert all(torch.equal(a, b) for a, b in zip(out, ragged))


def test_the_loss_equals_evaluate_on_the_same_tokens(loaded):
    model, hf_model, _ = loaded
    torch.manual_seed(2)
    tokens = torch.randint(0, 256, (1, 150))
    output = hf_model(tokens, labels=tokens)
    assert output.logits.shape == (1, 150, 256)
    assert output.loss.item() == pytest.approx(evaluate(model, tokens[0]).loss, rel=1e-5)
    # a left-padded row scores as alone (labelled -100: the padding, and the first token, which nothing predicts)
    padded = torch.cat([torch.zeros(1, 20, dtype=torch.long), tokens[:, :100]], dim=1)
    mask = torch.cat([torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 100, dtype=torch.long)], dim=1)
    labels = padded.clone()
    labels[:, :21] = -100
    loss = hf_model(padded, attention_mask=mask, labels=labels).loss
    assert loss.item() == pytest.approx(evaluate(model, tokens[0, :100]).loss, rel=1e-5)
    loss.backward()  # trainable through transformers too
    assert hf_model.model.token_emb.weight.grad is not None
    hf_model.zero_grad(set_to_none=True)


def test_a_text_generation_pipeline_runs(loaded):
    model, hf_model, tokenizer = loaded
    generator = pipeline("text-generation", model=hf_model, tokenizer=tokenizer, device="cpu")
    [result] = generator("def main(", max_new_tokens=20, do_sample=False)
    prompt = torch.tensor(ByteTokenizer().encode("def main("), dtype=torch.long)
    expected = "def main(" + ByteTokenizer().decode(generate(model, prompt, 20, temperature=0)[0].tolist())
    assert result["generated_text"] == expected


def test_lm_evaluation_harness_scores_a_local_task_as_the_library_does(loaded, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")
    pytest.importorskip("accelerate", reason="lm_eval's hf model needs accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, hf_model, tokenizer = loaded
    docs = [{"context": "def main(", "continuation": "):\n    return 0"},
            {"context": "the quick brown", "continuation": " fox"},
            {"context": "import os\n" * 4 + "import os", "continuation": "\nimport sys" * 3}]  # 49 + 33 bytes
    # (lm_eval moves a context's trailing spaces into the continuation: these contexts have none)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "brt_local.yaml").write_text(f"""task: brt_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=2, device="cpu")
    results = simple_evaluate(model=lm, tasks=["brt_local"], task_manager=TaskManager(include_path=str(tmp_path)),
                              log_samples=True)
    scored = {s["doc"]["context"]: s["filtered_resps"][0][0] for s in results["samples"]["brt_local"]}
    for doc in docs:
        context, continuation = (ByteTokenizer().encode(doc[k]).tolist() for k in ("context", "continuation"))
        # the library's own per-position losses of the whole text; the continuation's are its last ones
        result = evaluate(model, torch.tensor(context + continuation), bucket_size=1)
        own = -sum(loss for _, loss, _ in result.bucket_losses[-len(continuation):])
        assert float(scored[doc["context"]]) == pytest.approx(own, rel=1e-5)


def test_a_run_with_a_tokenizer_file_converts_with_that_tokenizer(tmp_path):
    from test_data import write_bpe

    from block_recurrent.training.data import load_tokenizer

    texts = ["def function(argument):\n    return argument\n"] * 50
    bpe = write_bpe(tmp_path / "bpe.json", texts)
    torch.manual_seed(0)
    model = BlockRecurrentModel(BlockRecurrentConfig.from_name("tiny", num_tokens=300)).eval()
    save_pretrained(model, tmp_path / "checkpoint", tokenizer_file=bpe)
    folder = brt_hf.convert_checkpoint(tmp_path / "checkpoint", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("def function(x):", return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer(bpe).encode("def function(x):").tolist()
    out = AutoModelForCausalLM.from_pretrained(folder).generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(out[:, ids.shape[1]:], generate(model, ids, 40, temperature=0))
