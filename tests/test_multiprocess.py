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


@pytest.mark.parametrize("method", ["ppo", "grpo"])
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
