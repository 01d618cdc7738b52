"""The training scripts under DeepSpeed ZeRO-3 through Accelerate, with the shipped config
(configs/deepspeed_zero3.yaml), on two gloo processes on CPU: weights, gradients and optimizer state
sharded, the same weights as data parallelism (DDP) on the same two processes, a resumed run the
same as an uninterrupted one, and the final model whole in one safetensors file that loads on one
process. Sampling under ZeRO-3 (PPO, GRPO, DPO's report, the LM's samples) decodes on both
processes in step (PaLM.generate's synced_gpus), as each forward gathers the weights."""
import pytest
import torch
from launch import ROOT, accelerate_launch
from safetensors.torch import load_file
from test_multiprocess_scripts import DPO, GRPO, LM, PPO, REWARD
from test_train_ppo import checkpoints  # noqa: F401 (the tiny LM and reward model, a fixture)

from palm_rlhf import PaLM

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")  # Accelerate's DeepSpeed plugin imports its DeepSpeed config class

ZERO3 = ROOT / "configs" / "deepspeed_zero3.yaml"
SHARDED = "weights sharded across 2 process(es)"


def launch(script, run_dir, *args, config=ZERO3, mixed_precision="no"):
    out = accelerate_launch(ROOT / script, *args, "--out_dir", run_dir, config_file=config, mixed_precision=mixed_precision)
    if out.returncode:
        log = run_dir.with_name(run_dir.name + ".stderr")
        log.write_text(out.stderr)
        raise AssertionError(f"{script} failed; its whole stderr is in {log}\n{out.stderr[-3000:]}")
    return out


def final_weights(run_dir) -> dict:
    return load_file(next((run_dir / "final").glob("*.safetensors")))


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_the_language_model_under_zero3_trains_as_ddp_does_and_resumes(tmp_path):
    # a small clipping norm, so that DeepSpeed's clipping (at the script's --max_grad_norm) acts, and
    # two micro-batches per step, which DeepSpeed must accumulate as the script asks
    tiny = [*LM, "--max_grad_norm", "0.1", "--grad_accum", "2"]
    zero3 = launch("train_lm.py", tmp_path / "zero3", *tiny, "--steps", "3")
    assert SHARDED in zero3.stdout and "2 process(es)" in zero3.stdout
    assert (tmp_path / "zero3" / "checkpoint" / "sharded").is_dir()  # each process's part of the optimizer
    launch("train_lm.py", tmp_path / "ddp", *tiny, "--steps", "3", config=None)
    launch("train_lm.py", tmp_path / "resumed", *tiny, "--steps", "2")
    resumed = launch("train_lm.py", tmp_path / "resumed", *tiny, "--steps", "3", "--resume")
    assert "step 3" in resumed.stdout
    weights = final_weights(tmp_path / "zero3")
    assert_same_weights(weights, final_weights(tmp_path / "ddp"), atol=1e-6)
    assert_same_weights(weights, final_weights(tmp_path / "resumed"), atol=1e-6)
    whole = PaLM.from_pretrained(tmp_path / "zero3" / "final")  # gathered, not a process's empty part
    assert [p.shape for p in whole.parameters()] == [p.shape for p in PaLM.from_config(whole.config).parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("script, tiny, resume", [
    ("train_ppo.py", [*PPO, "--iterations"], True),
    ("train_grpo.py", [*GRPO, "--iterations"], False),
])
def test_rl_under_zero3_trains_as_ddp_does(tmp_path, checkpoints, script, tiny, resume):  # noqa: F811
    # no clipping: DeepSpeed clips one norm over all trained parameters, PPO the actor's and critic's apart
    args = [*checkpoints, "--max_grad_norm", "0", *tiny]
    zero3 = launch(script, tmp_path / "zero3", *args, "2")
    assert SHARDED in zero3.stdout
    launch(script, tmp_path / "ddp", *args, "2", config=None)
    weights = final_weights(tmp_path / "zero3")
    assert_same_weights(weights, final_weights(tmp_path / "ddp"), atol=1e-6)
    if resume:
        launch(script, tmp_path / "resumed", *args, "1")
        assert "resumed at iteration 1" in launch(script, tmp_path / "resumed", *args, "2", "--resume").stdout
        assert_same_weights(weights, final_weights(tmp_path / "resumed"), atol=1e-6)
    PaLM.from_pretrained(tmp_path / "zero3" / "final")


@pytest.mark.slow
def test_dpo_and_the_reward_model_under_zero3_train_as_ddp_does(tmp_path, checkpoints):  # noqa: F811
    for script, args in (("train_dpo.py", [*DPO, checkpoints[0], checkpoints[1], "--steps", "2"]),
                         ("train_reward.py", [*REWARD, "--steps", "2"])):
        run = tmp_path / script
        assert SHARDED in launch(script, run / "zero3", *args, "--max_grad_norm", "0").stdout
        launch(script, run / "ddp", *args, "--max_grad_norm", "0", config=None)
        assert_same_weights(final_weights(run / "zero3"), final_weights(run / "ddp"), atol=1e-6)


@pytest.mark.slow
def test_the_configs_bf16_reaches_the_lm_and_ppo_whose_frozen_reward_head_stays_fp32(tmp_path, checkpoints):  # noqa: F811
    # the shipped config's precision (bf16), as `accelerate launch --config_file` gives it: DeepSpeed
    # casts the prepared model to bf16; PPO's reward model shares that base but keeps its fp32 head
    launch("train_lm.py", tmp_path / "lm", *LM, "--steps", "2", mixed_precision=None)
    assert {v.dtype for v in final_weights(tmp_path / "lm").values()} == {torch.bfloat16}
    assert SHARDED in launch("train_ppo.py", tmp_path / "ppo", *checkpoints, *PPO, "--iterations", "1",
                             mixed_precision=None).stdout
    # the policy is merged in fp32 (whole_copy): the blocks' feedforward weights, which LoRA leaves alone, are bf16 values
    policy = final_weights(tmp_path / "ppo")
    ff_out = policy["layers.0.ff_out.weight"]
    assert torch.equal(ff_out.to(torch.bfloat16).float(), ff_out)
    PaLM.from_pretrained(tmp_path / "ppo" / "final")
