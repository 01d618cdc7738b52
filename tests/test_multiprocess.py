"""PPO and GRPO on two gloo processes (tests/multiprocess_worker.py), checked against one process."""
import json

import multiprocess_worker as worker
import pytest
import torch
from launch import ROOT, accelerate_launch


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    out = accelerate_launch(ROOT / "tests" / "multiprocess_worker.py", out_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((out_dir / "ranks.json").read_text()), out_dir


def prompts_of(report) -> list:
    return sorted(tuple(row[: report["start"]]) for row in report["seq"])


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_each_process_draws_its_own_prompts_and_samples(launched, method):
    first, second = (ranks[method] for ranks in launched[0])
    assert prompts_of(first) != prompts_of(second)
    assert first["seq"] != second["seq"]


def test_process_0_draws_what_one_process_with_the_same_seed_draws(launched):
    trainer = worker.ppo_trainer()
    prompts, generator = trainer.draw_prompts(worker.BATCH)
    rollout, _ = trainer.rollout(prompts, worker.SEQ_LEN, generator=generator)
    assert rollout.seq.tolist() == launched[0][0]["ppo"]["seq"]


@pytest.mark.parametrize("method", ["ppo", "grpo", "grpo_dynamic"])
def test_parameters_and_logged_diagnostics_agree_across_processes(launched, method):
    first, second = (ranks[method] for ranks in launched[0])
    assert first["checksum"] == second["checksum"]
    assert first["stats"] == second["stats"]  # reduced over processes


def test_the_kl_controller_counts_the_episodes_of_every_process(launched):
    ranks = launched[0]
    assert ranks[0]["ppo"]["stats"]["kl"] == 0  # the policy starts as the reference: KL below target
    per_process = worker.KL["beta"] * (1 - 0.2 * worker.BATCH / worker.KL["kl_horizon"])
    both = worker.KL["beta"] * (1 - 0.2 * 2 * worker.BATCH / worker.KL["kl_horizon"])
    assert ranks[0]["beta"] == ranks[1]["beta"] == pytest.approx(both) != pytest.approx(per_process)


def test_an_update_on_half_a_rollout_per_process_equals_one_on_the_whole(launched):
    trainer = worker.ppo_trainer(minibatch_size=2 * worker.BATCH)
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    trainer.learn(worker.fixed_rollout(trainer))
    two_processes = torch.load(launched[1] / "half_rollout.pt")
    one_process = trainer.unwrapped.state_dict()
    assert any(not torch.equal(before[k], one_process[k]) for k in before)  # the update moved something
    for name, value in one_process.items():
        torch.testing.assert_close(two_processes[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(worker.GRADIENT_CASES))
def test_one_step_gradient_is_the_same_in_one_pass_in_micro_batches_and_over_two_processes(launched, case):
    """Responses of unequal lengths: token and sequence means are of the whole minibatch, not of each
    micro-batch's or process's share of it (DAPO's token mean; the trackers' gradient-accumulation bug)."""
    trainer = worker.gradient_trainer(case)
    rollout = worker.unequal_rollout(trainer)
    lengths = rollout.mask[:, rollout.start:].sum(dim=1)
    half = len(lengths) // 2
    assert lengths[:half].sum() != lengths[half:].sum()  # the processes' token counts differ
    whole = worker.one_step_gradient(trainer, rollout)
    in_micro_batches = worker.one_step_gradient(worker.gradient_trainer(case, micro_batch_size=3), rollout)
    two_processes = torch.load(launched[1] / "gradients.pt")[case]
    assert whole and set(whole) == set(in_micro_batches) == set(two_processes)
    assert any(g.abs().max() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(in_micro_batches[name], gradient, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two_processes[name], gradient, rtol=1e-4, atol=1e-6)


def test_kto_reference_point_is_clamped_after_the_average_over_processes(launched):
    # process 0's mean log-ratio is -1.625, process 1's 1.375: clamped apart they would give 0.6875
    assert launched[0][0]["kto_z0"] == launched[0][1]["kto_z0"] == pytest.approx(0.0)
    one_process = worker.kto_kl_estimate(worker.KTO_LOG_RATIOS.flatten(), torch.zeros(8))
    assert float(one_process) == pytest.approx(0.0)
    assert float(worker.kto_kl_estimate(worker.KTO_LOG_RATIOS[1], torch.zeros(4))) == pytest.approx(1.375)
