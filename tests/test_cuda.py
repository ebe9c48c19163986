"""The CUDA paths: skipped without a GPU (CI has none); benchmarks/gpu_check.sh runs them where there is one."""

import pytest
import torch

from block_recurrent import RecurrentTrainerWrapper
from block_recurrent.inference.generation import generate, prefill, decode_step

from conftest import make_model, random_tokens
from test_generation import CONFIGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_forward_and_cached_decoding_equal_the_cpu(config):
    cpu = make_model(torch.float64, **CONFIGS[config])
    gpu = make_model(torch.float64, **CONFIGS[config]).cuda()
    text = random_tokens(2, 23)
    with torch.no_grad():
        expected, _ = cpu.run(text)
        got, _ = gpu.run(text.cuda())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-9)
        logits, ds = prefill(gpu, text[:, :5].cuda())
        steps = [logits]
        for t in range(5, text.shape[1]):
            logits, ds = decode_step(gpu, text[:, t].cuda(), ds)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1).cpu(), expected[:, 4:], rtol=1e-9, atol=1e-9)


def test_cuda_bf16_training_and_flash_kernels_stay_close_to_float32():
    model = make_model(torch.float32).cuda().train()
    wrapper = RecurrentTrainerWrapper(model)
    seq = random_tokens(4, 3 * model.config.max_seq_len + 1).cuda()
    with torch.no_grad():
        full = wrapper(seq).item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = wrapper.forward_backward(seq)
    assert abs(result.loss.item() - full) < 0.05 * full
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_cuda_ragged_generation_equals_each_prompt_alone():
    model = make_model(torch.float32).cuda()
    prompts = [random_tokens(1, n, seed=n)[0].cuda() for n in (1, 5, 17, 40)]
    together = generate(model, prompts, 20, temperature=0)
    for prompt, row in zip(prompts, together):
        assert torch.equal(row, generate(model, prompt, 20, temperature=0)[0])
