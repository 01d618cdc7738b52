"""The CUDA paths: attention backends in bf16 and one step of every stage in bf16 and fp16. Each test
runs only where CUDA is present (the flash-attn test also needs the flash-attn package)."""
import subprocess
import sys

import pytest
import torch
from launch import ROOT
from test_multiprocess_scripts import DPO, GRPO, LM, PPO, REWARD
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.model import flash_attn_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def forward_backward(palm, x, mask, backend):
    """Logits and parameter gradients of one bf16-autocast pass through `backend`."""
    palm.zero_grad()
    palm.attn_backend = backend
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = palm(x, mask=mask)
    (logits.float() * (1 if mask is None else mask[..., None])).square().mean().backward()
    return logits.float(), [p.grad.float().clone() for p in palm.parameters()]


@pytest.mark.parametrize("backend, padded", [
    ("sdpa", False), ("sdpa", True),
    pytest.param("flash", False, marks=pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn")),
])
def test_fused_attention_equals_math_in_bf16_forward_and_backward(backend, padded):
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("small")).cuda()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    mask = None
    if padded:
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[0, :40] = False  # left padding
    logits_math, grads_math = forward_backward(palm, x, mask, "math")
    logits, grads = forward_backward(palm, x, mask, backend)
    torch.testing.assert_close(logits, logits_math, atol=5e-2, rtol=5e-2)
    for grad, grad_math in zip(grads, grads_math):
        torch.testing.assert_close(grad, grad_math, atol=2e-2, rtol=1e-1)


def run_script(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("script", ["train_lm.py", "train_reward.py", "train_ppo.py", "train_grpo.py", "train_dpo.py"])
def test_one_step_of_each_stage(tmp_path, checkpoints, script, precision):  # noqa: F811
    args = {
        "train_lm.py": [*LM, "--steps", "1", "--cache_dir", tmp_path / "cache"],
        "train_reward.py": [*REWARD, "--steps", "1"],
        "train_ppo.py": [*PPO, *checkpoints, "--iterations", "1"],
        "train_grpo.py": [*GRPO, *checkpoints, "--iterations", "1"],
        "train_dpo.py": [*DPO, "--lm_checkpoint", checkpoints[1], "--steps", "1"],
    }[script]
    out = run_script(script, *args, "--mixed_precision", precision, "--out_dir", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
