import math

import pytest
import torch
from accelerate import Accelerator

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.ppo import RLHFTrainer, clipped_policy_loss, clipped_value_loss, gae, memmap_rollout
from palm_rlhf.rl import KLController, kl_penalty, masked_whiten, response_mask
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import EOS_ID, PAD_ID

TARGET = ord("a")
PROMPTS = [torch.tensor([EOS_ID, 84, 104, 101]), torch.tensor([EOS_ID, 65])]


def tiny_palm(seed=0):
    torch.manual_seed(seed)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny"))
    # a trained LM's embeddings are far from the 0.02 init; at that init the tied output layer caps
    # every logit near +-1.3 and no adapter can make any byte likely
    torch.nn.init.normal_(palm.token_emb.weight, std=0.06)
    return palm


def count_target(seq, prompt_mask, mask):
    """A programmatic reward: how often the response contains the byte 'a'."""
    return ((seq == TARGET) & mask & ~prompt_mask).float().sum(dim=1)


# the trainer's defaults before they became train_ppo.py's (PPOConfig), which these tests were written against
BEFORE = dict(actor_lr=1e-4, critic_lr=1e-4, beta=0.05, max_grad_norm=0, rollout_batch_size=64)


def trainer(palm=None, **kwargs):
    kwargs = dict(dict(reward_fn=count_target, prompt_token_ids=PROMPTS, minibatch_size=8, epochs=2, **BEFORE), **kwargs)
    return RLHFTrainer(palm=palm or tiny_palm(), **kwargs)


# --- the maths ------------------------------------------------------------------------------------


def naive_gae(rewards, values, length, gamma, lam):
    advantages = []
    for t in range(length):
        total = 0.0
        for l in range(t, length):
            next_value = values[l + 1] if l + 1 < length else 0.0
            total += (gamma * lam) ** (l - t) * (rewards[l] + gamma * next_value - values[l])
        advantages.append(total)
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_equals_a_naive_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = torch.tensor(naive_gae(rewards[i].tolist(), values[i].tolist(), n, gamma, lam))
        torch.testing.assert_close(advantages[i, :n], expected)
        torch.testing.assert_close(returns[i, :n], expected + values[i, :n])
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    expected = (torch.tensor([1.0, 2.0, 3.0]) - 2) / torch.tensor(2 / 3).sqrt()
    torch.testing.assert_close(masked_whiten(x, mask)[0, :3], expected, atol=1e-5, rtol=1e-5)
    assert masked_whiten(x, mask)[0, 3] == 0


def test_clipped_policy_loss_on_three_tokens_with_clipping_active():
    ratio = torch.tensor([1.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -2.0])
    old = torch.zeros(3)
    loss, clip_fraction = clipped_policy_loss(ratio.log(), old, advantages, torch.ones(3, dtype=torch.bool), 0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2 (clipped); token 1: min(0.5, 0.8) = 0.5 (not clipped);
    # token 2: min(1.1 * -2, 1.1 * -2) = -2.2 (inside the range)
    torch.testing.assert_close(loss, -torch.tensor((1.2 + 0.5 - 2.2) / 3))
    torch.testing.assert_close(clip_fraction, torch.tensor(1 / 3))


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
    log_ratio = torch.tensor([1.5, 1.1]).log().requires_grad_()
    loss, _ = clipped_policy_loss(log_ratio, torch.zeros(2), torch.ones(2), torch.ones(2, dtype=torch.bool), 0.2)
    loss.backward()
    assert log_ratio.grad[0] == 0 and log_ratio.grad[1] != 0


def test_clipped_value_loss_on_three_tokens():
    values, old, returns = torch.tensor([2.0, 0.1, 0.0]), torch.zeros(3), torch.tensor([0.0, 1.0, 1.0])
    loss, fraction = clipped_value_loss(values, old, returns, torch.ones(3, dtype=torch.bool), 0.2)
    # token 0: max((2-0)^2, (0.2-0)^2) = 4; token 1: max(0.81, 0.81); token 2: max(1, 1)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (4 + 0.81 + 1) / 3))
    assert fraction == 0  # the clipped error is never the larger one here
    loss, fraction = clipped_value_loss(torch.tensor([2.0]), torch.zeros(1), torch.tensor([3.0]), torch.ones(1, dtype=torch.bool), 0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 2.8**2))
    assert fraction == 1


def test_kl_estimators_agree_on_average_and_vanish_on_equal_policies():
    torch.manual_seed(0)
    p, q = torch.randn(6).softmax(0), torch.randn(6).softmax(0)  # policy p, reference q
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200000, replacement=True)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(p.log()[samples], q.log()[samples], estimator).mean()
        torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0.05)
    for estimator in ("k1", "k2", "k3"):
        assert (kl_penalty(p.log(), p.log(), estimator) == 0).all()


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    controller = KLController(0.1, target=6.0, horizon=100)
    controller.update(12.0, 10)  # KL too high: beta grows by the clipped error 0.2 * 10 / 100
    assert controller.beta == pytest.approx(0.1 * 1.02)
    controller.update(0.0, 10)
    assert controller.beta == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.beta == 0.1
    floored = KLController(0.1, target=6.0, horizon=100, floor=0.99)
    floored.update(0.0, 10)  # 0.098 without the floor
    assert floored.beta == pytest.approx(0.099)
    floored.update(12.0, 10)
    assert floored.beta == pytest.approx(0.099 * 1.02)


def test_an_extreme_log_ratio_at_padding_leaves_the_losses_finite():
    mask = torch.tensor([[True, True, False]])
    log_probs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -1000.0]])  # the padded position: exp(1000) is inf
    advantages = torch.ones(1, 3)
    loss, clip_fraction = clipped_policy_loss(log_probs, old, advantages, mask, 0.2)
    kl = kl_penalty(log_probs, old, "k3", mask).sum() + kl_penalty(log_probs, old, "k2", mask).sum()
    (loss + kl).backward()
    assert torch.isfinite(loss) and torch.isfinite(kl) and torch.isfinite(log_probs.grad).all()
    assert log_probs.grad[0, 2] == 0
    expected, _ = clipped_policy_loss(log_probs[:, :2], old[:, :2], advantages[:, :2], mask[:, :2], 0.2)
    torch.testing.assert_close(loss, expected)


def test_response_mask_keeps_tokens_through_the_first_eos():
    tokens = torch.tensor([[5, EOS_ID, PAD_ID], [5, 6, 7], [EOS_ID, PAD_ID, PAD_ID]])
    assert response_mask(tokens, EOS_ID).tolist() == [[True, True, False], [True, True, True], [True, False, False]]


# --- the trainer ----------------------------------------------------------------------------------


def test_kl_is_zero_while_the_policy_equals_the_reference():
    t = trainer()
    rollout, stats = t.rollout(PROMPTS * 4, max_seq_len=12)
    assert stats["kl"] == 0.0
    ref = t.palm.log_probs(rollout.seq, rollout.mask, disable_lora=True)[:, rollout.start - 1:]
    torch.testing.assert_close(rollout.log_probs, ref, atol=0, rtol=0)
    assert (rollout.values == 0).all()  # the value head starts at zero


def test_rollout_is_batched_padded_and_ends_at_eos():
    t = trainer()
    rollout, _ = t.rollout(PROMPTS * 3, max_seq_len=12, temperature=0.7)
    assert rollout.seq.shape[0] == 6 and rollout.seq.shape[1] <= 12
    assert rollout.start == 4  # the longest prompt; the shorter one is left-padded
    assert not rollout.mask[1, :2].any() and rollout.seq[1, 0] == PAD_ID
    response = rollout.seq[:, rollout.start:]
    response_real = rollout.mask[:, rollout.start:]
    assert (response[~response_real] == PAD_ID).all()
    ended = (response == EOS_ID) & response_real
    assert (ended.sum(dim=1) <= 1).all()
    # the log-probs are those of the sampling temperature
    logits = t.palm(rollout.seq[:, :-1], mask=rollout.mask[:, :-1], finetune_scope="actor")[:, rollout.start - 1:]
    expected = (logits / 0.7).log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    torch.testing.assert_close(rollout.log_probs[response_real], expected[response_real], atol=1e-5, rtol=1e-5)


def low_bytes(seq, prompt_mask, mask):
    """A reward that varies from sample to sample: the response's bytes below 128."""
    return ((seq < 128) & mask & ~prompt_mask).float().sum(dim=1)


def test_missing_eos_penalty_is_subtracted():
    results = []
    for penalty in (3.0, None):  # two trainers that draw the same samples: the same adapters, one generator
        torch.manual_seed(0)
        t = trainer(missing_eos_penalty=penalty, reward_fn=low_bytes)
        results.append(t.rollout(PROMPTS * 4, max_seq_len=8, generator=torch.Generator().manual_seed(1)))
    (rollout, stats), (rollout_without, stats_without) = results
    assert torch.equal(rollout.seq, rollout_without.seq) and stats_without["score"] > 0
    assert stats["ended_with_eos"] < 1
    assert stats["score"] == pytest.approx(stats_without["score"] - 3.0 * (1 - stats["ended_with_eos"]))


def test_only_actor_and_critic_adapters_move_base_and_reward_model_stay_frozen():
    palm = tiny_palm()
    reward_model = RewardModel(palm, num_binned_output=5)
    t = trainer(palm, reward_fn=None, reward_model=reward_model, actor_lr=1e-2, critic_lr=1e-2)
    before = {k: v.clone() for k, v in reward_model.state_dict().items()}
    head_before = {k: v.clone() for k, v in t.unwrapped.value_head.state_dict().items()}
    t.train(num_episodes=8, max_seq_len=10, rollout_batch_size=8)
    for name, value in reward_model.state_dict().items():
        moved = not torch.equal(before[name], value)
        trained = ".finetune_modules.actor." in name or ".finetune_modules.critic." in name
        if trained and name.endswith(".B"):
            assert moved, f"{name} did not move"
        if not trained:
            assert not moved, f"{name} moved"
    assert any(not torch.equal(head_before[k], v) for k, v in t.unwrapped.value_head.state_dict().items())


def test_ppo_raises_the_reward_with_bounded_kl():
    torch.manual_seed(0)
    t = trainer(actor_lr=3e-3, critic_lr=3e-3, beta=0.02, minibatch_size=16, epochs=4)
    history = t.train(num_episodes=16 * 20, max_seq_len=16, rollout_batch_size=16)
    first, last = [sum(h["score"] for h in part) / 4 for part in (history[:4], history[-4:])]
    assert last > first + 0.75, (first, last)  # 'a' goes from ~0.1 to more than 0.85 per response
    assert all(h["kl"] < 20 for h in history)


def test_gradient_clipping_runs_and_bounds_the_gradient_norm(monkeypatch):
    t = trainer(max_grad_norm=1e-3, actor_lr=1e-2)
    clip = torch.nn.utils.clip_grad_norm_
    norms = []

    def spy(parameters, max_norm):
        parameters = list(parameters)
        clip(parameters, max_norm)
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    t.step(max_seq_len=12, rollout_batch_size=8)
    assert len(norms) == 2 * t.config.epochs  # actor and critic, once per minibatch
    assert all(n <= 1e-3 * 1.01 for n in norms)


def test_fp16_gradient_clipping_unscales_once_per_optimizer_step(monkeypatch):
    # a CPU stand-in for CUDA fp16: Accelerate's GradScaler path, whose unscale_ raises when called
    # twice on one optimizer before its step (as clipping actor and critic by two
    # accelerator.clip_grad_norm_ calls did)
    accelerator = Accelerator(cpu=True)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    t = trainer(max_grad_norm=1.0, accelerator=accelerator)
    unscale = accelerator.scaler.unscale_
    calls = []
    monkeypatch.setattr(accelerator.scaler, "unscale_", lambda optimizer: calls.append(1) or unscale(optimizer))
    stats, _ = t.step(max_seq_len=12, rollout_batch_size=8)
    assert len(calls) == t.config.epochs  # one minibatch per epoch, one unscale each
    assert all(math.isfinite(v) for v in stats.values())


def test_best_of_n_returns_the_highest_scoring_sample():
    t = trainer()
    torch.manual_seed(0)
    best, scores, index = t.generate(16, prompt=PROMPTS[0], num_samples=16, return_scores=True)
    assert scores.shape == (16,) and scores[index] == scores.max() and scores.max() > scores.min()
    assert torch.equal(best[:4], PROMPTS[0]) and (best != PAD_ID).all()
    prompt_mask = torch.arange(len(best)) < 4
    rescored = count_target(best[None], prompt_mask[None], torch.ones_like(prompt_mask)[None])
    assert rescored.item() == scores.max()
    assert t.generate(16, prompt="The", num_samples=2).ndim == 1  # text prompts work too


def test_memmapped_rollout_equals_the_in_memory_one(tmp_path):
    t = trainer()
    rollout, _ = t.rollout(PROMPTS * 2, max_seq_len=10)
    mapped = memmap_rollout(rollout, tmp_path)
    for name in rollout.tensor_names():
        assert torch.equal(getattr(mapped, name), getattr(rollout, name))
        assert (tmp_path / f"{name}.npy").is_file()
    results = []
    for memmap_dir in (None, tmp_path / "rollouts"):
        torch.manual_seed(0)
        t = trainer(rollout_memmap_dir=memmap_dir)
        stats, _ = t.step(max_seq_len=10, rollout_batch_size=8)
        results.append((stats, [p.detach().clone() for p in t.unwrapped.actor_parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_merged_policy_is_a_plain_palm_that_matches_the_actor(tmp_path):
    t = trainer(actor_lr=1e-2)
    t.step(max_seq_len=10, rollout_batch_size=8)
    t.save_policy(tmp_path / "policy")
    policy = PaLM.from_pretrained(tmp_path / "policy")
    assert not policy.finetune_modules
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(policy(x), t.palm(x, finetune_scope="actor"), atol=1e-5, rtol=1e-4)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="reward_model or reward_fn"):
        RLHFTrainer(palm=tiny_palm(), prompt_token_ids=PROMPTS)
    with pytest.raises(ValueError, match="exactly one of prompt_token_ids"):
        RLHFTrainer(palm=tiny_palm(), reward_fn=count_target)
    with pytest.raises(ValueError, match="KL estimator"):
        trainer(kl_estimator="k4")


def test_with_dropout_the_first_ratio_is_exactly_one():
    # dropout would make the update's log-probs another function than the rollout's: RL runs without it
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", attn_dropout=0.3, ff_dropout=0.3))
    t = trainer(palm, epochs=1, minibatch_size=64)
    rollout, _ = t.rollout(PROMPTS * 4, max_seq_len=12)
    stats = t.learn(rollout)
    assert stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0


def test_temperature_zero_is_refused_with_a_clear_error():
    t = trainer()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        t.step(max_seq_len=10, rollout_batch_size=2, temperature=0.0)
