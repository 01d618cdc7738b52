import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.lora import LoRA

SCOPES = [dict(lora_r=4), dict(last_n_layers=1)]


def tiny():
    torch.manual_seed(0)
    return PaLM.from_config(PaLMConfig.from_name("tiny"))


def perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)


def test_lora_is_a_no_op_at_init_and_its_delta_matches_its_forward():
    lora = LoRA(6, 5, r=2, alpha=4)
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), torch.zeros(3, 5))
    perturb(lora.parameters())
    torch.testing.assert_close(lora(x), x @ lora.delta_weight().t())
    torch.testing.assert_close(lora(x), 2.0 * (x @ lora.A @ lora.B))  # scale = alpha / r


@pytest.mark.parametrize("spec", SCOPES)
def test_scope_equals_base_at_init(spec):
    palm = tiny()
    x = torch.randint(0, 256, (2, 10))
    base = palm(x)
    palm.add_finetune_params("actor", **spec)
    torch.testing.assert_close(palm(x, finetune_scope="actor"), base)


@pytest.mark.parametrize("spec", SCOPES)
def test_disable_lora_gives_the_base_model(spec):
    palm = tiny()
    x = torch.randint(0, 256, (2, 10))
    base = palm(x)
    palm.add_finetune_params("actor", **spec)
    perturb(palm.finetune_parameters("actor"))
    assert not torch.allclose(palm(x, finetune_scope="actor"), base)
    torch.testing.assert_close(palm(x, finetune_scope="actor", disable_lora=True), base)
    torch.testing.assert_close(palm(x), base)


@pytest.mark.parametrize("spec", SCOPES)
def test_merged_equals_unmerged(spec):
    palm = tiny()
    palm.add_finetune_params("actor", **spec)
    perturb(palm.finetune_parameters("actor"))
    x = torch.randint(0, 256, (2, 10))
    tuned = palm(x, finetune_scope="actor")
    palm.merge_finetune_params("actor")
    assert "actor" not in palm.finetune_modules
    torch.testing.assert_close(palm(x), tuned, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SCOPES)
def test_after_a_step_only_the_scopes_adapter_weights_changed(spec):
    palm = tiny()
    palm.add_finetune_params("actor", **spec)
    palm.add_finetune_params("critic", lora_r=4)
    palm.finetune_only("actor")
    before = {k: v.clone() for k, v in palm.state_dict().items()}
    optimizer = torch.optim.AdamW(palm.finetune_parameters("actor"), lr=1e-2)
    palm(torch.randint(0, 256, (2, 10)), return_loss=True, finetune_scope="actor").backward()
    optimizer.step()
    after = palm.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("finetune_modules.actor.") for k in moved)
    assert all(p.grad is None for n, p in palm.named_parameters() if not n.startswith("finetune_modules.actor."))


def test_scopes_are_switched_per_call_and_errors_name_the_known_scopes():
    palm = tiny()
    palm.add_finetune_params("actor", lora_r=4)
    palm.add_finetune_params("critic", lora_r=4)
    perturb(palm.finetune_parameters("actor"))
    x = torch.randint(0, 256, (1, 6))
    assert not torch.allclose(palm(x, finetune_scope="actor"), palm(x, finetune_scope="critic"))
    with pytest.raises(KeyError, match="actor"):
        palm(x, finetune_scope="reward")
    with pytest.raises(ValueError, match="already exists"):
        palm.add_finetune_params("actor")
    with pytest.raises(ValueError, match="last_n_layers"):
        palm.add_finetune_params("deep", last_n_layers=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_added_to_a_half_precision_model_take_its_dtype(dtype):
    palm = tiny().to(dtype)
    palm.add_finetune_params("tuned", lora_r=4)
    assert {p.dtype for p in palm.finetune_parameters("tuned")} == {dtype}
    assert palm(torch.randint(0, 256, (1, 6)), finetune_scope="tuned").dtype == dtype
