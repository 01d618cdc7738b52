import math

import pytest
import torch
from test_ppo import PROMPTS, TARGET, count_target, tiny_palm

from palm_rlhf.grpo import (
    GRPOTrainer, aggregate_loss, chosen_groups, dr_grpo_advantages, grpo_advantages, merge_samples, overlong_penalty,
    reinforce_pp_advantages, rloo_advantages, sequence_log_ratio,
)
from palm_rlhf.ppo import clipped_policy_loss
from palm_rlhf.rl import clipped_surrogate, kl_penalty, text_reward_fn
from palm_rlhf.reward import RewardModel
from palm_rlhf.tokenizer import EOS_ID, PAD_ID

# two prompts x four samples
SCORES = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])


# --- advantage estimators -------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    # prompt 0: mean 3, deviations -2 -1 0 3, sample variance (4 + 1 + 0 + 9) / 3
    # prompt 1: mean 0.5, deviations +-0.5, sample variance 4 * 0.25 / 3
    std0, std1 = math.sqrt(14 / 3), math.sqrt(1 / 3)
    expected = torch.tensor([[-2 / (std0 + 1e-4), -1 / (std0 + 1e-4), 0.0, 3 / (std0 + 1e-4)],
                             [-0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4)]])
    torch.testing.assert_close(grpo_advantages(SCORES), expected)
    torch.testing.assert_close(grpo_advantages(SCORES, eps=0.0)[1], torch.tensor([-1.0, -1.0, 1.0, 1.0]) * math.sqrt(3) / 2)


def test_dr_grpo_advantages_by_hand():
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [-0.5, -0.5, 0.5, 0.5]])
    torch.testing.assert_close(dr_grpo_advantages(SCORES), expected)


def test_rloo_advantages_by_hand():
    # prompt 0: 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], [-2 / 3, -2 / 3, 2 / 3, 2 / 3]])
    torch.testing.assert_close(rloo_advantages(SCORES), expected)


@pytest.mark.parametrize("estimator", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_equal_scores_give_exactly_zero_advantage(estimator):
    # the float32 mean of eight 0.7s is off by an ulp: without care GRPO would turn that into ~6e-4
    scores = torch.tensor([[0.7] * 8, [0.0] * 8, [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    advantages = estimator(scores)
    assert (advantages[:2] == 0).all()
    assert advantages[2, 1] > 0 and (advantages[2, [0, 2]] < 0).all()


def test_one_sample_per_prompt_gives_zero_advantage_or_a_clear_error():
    scores = torch.tensor([[3.0], [-1.0]])
    assert (grpo_advantages(scores) == 0).all() and (dr_grpo_advantages(scores) == 0).all()
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(scores)


# --- the loss -------------------------------------------------------------------------------------


def test_loss_aggregations_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate_loss(losses, mask, "token") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(losses, mask, "sequence") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert aggregate_loss(losses, mask, "constant", max_len=5) == pytest.approx((1 + 2 + 3 + 4) / (2 * 5))
    with pytest.raises(ValueError, match="loss_aggregation"):
        aggregate_loss(losses, mask, "mean")


def test_clip_higher_widens_only_the_upper_bound():
    ratio, advantages = torch.tensor([1.3, 1.25, 0.7]), torch.tensor([1.0, 1.0, -1.0])
    log_ratio, old = ratio.log(), torch.zeros(3)
    # eps 0.2 both ways: 1.3 and 1.25 are cut to 1.2; 0.7 with a negative advantage is held at 0.8
    losses, clipped = clipped_surrogate(log_ratio, old, advantages, clip=0.2)
    torch.testing.assert_close(losses, torch.tensor([-1.2, -1.2, 0.8]))
    assert clipped.tolist() == [True, True, True]
    # eps_high 0.28: 1.3 is cut to 1.28, 1.25 is inside; the lower bound is unchanged
    losses, clipped = clipped_surrogate(log_ratio, old, advantages, clip=0.2, clip_high=0.28)
    torch.testing.assert_close(losses, torch.tensor([-1.28, -1.25, 0.8]))
    assert clipped.tolist() == [True, False, True]
    # so the gradient reaches the token at 1.25 only with the higher clip
    log_ratio.requires_grad_()
    loss, fraction = clipped_policy_loss(log_ratio, old, advantages, torch.ones(3, dtype=torch.bool), 0.2, 0.28)
    loss.backward()
    assert log_ratio.grad.tolist()[0] == 0 and log_ratio.grad[1] != 0 and log_ratio.grad.tolist()[2] == 0
    assert fraction == pytest.approx(2 / 3)


def test_reinforce_pp_advantages_by_hand():
    scores = torch.tensor([[1.0, 3.0]])  # one prompt, two responses
    penalty = torch.tensor([[0.1, 0.2, 0.0], [0.3, 5.0, 5.0]])  # beta * KL per token; response 1 is one token long
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for baseline, (r0, r1) in ((False, (1.0, 3.0)), (True, (-1.0, 1.0))):
        # the penalty still to come: response 0 pays 0.1 + 0.2 at its first token, 0.2 at its second
        returns = torch.tensor([r0 - 0.3, r0 - 0.2, r1 - 0.3])
        whitened = (returns - returns.mean()) / returns.var(unbiased=False).add(1e-8).sqrt()
        expected = torch.tensor([[whitened[0], whitened[1], 0.0], [whitened[2], 0.0, 0.0]])
        torch.testing.assert_close(reinforce_pp_advantages(scores, penalty, mask, baseline), expected)
    equal = reinforce_pp_advantages(torch.tensor([[2.0, 2.0]]), None, mask, baseline=True)
    assert (equal == 0).all()  # a group of equal scores has no signal


def test_gspo_clips_one_length_normalised_ratio_per_response_by_hand():
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[0.3, -0.1, 0.4], [0.5, 7.0, -9.0]], requires_grad=True)  # row 1: one token, then padding
    mask = torch.tensor([[True, True, True], [True, False, False]])
    log_ratio = sequence_log_ratio(log_probs, old, mask)
    torch.testing.assert_close(log_ratio, torch.tensor([[0.2] * 3, [0.5] * 3]))  # (0.3 - 0.1 + 0.4) / 3; the padding ignored
    advantages = torch.tensor([[1.0], [-1.0]])
    losses, clipped = clipped_surrogate(old + log_ratio, old, advantages, clip=0.1, mask=mask)
    # s_0 = e^0.2 = 1.221 with A = +1 is cut to 1.1; s_1 = e^0.5 = 1.649 with A = -1 is not (-A * s > -A * 1.1)
    assert clipped[mask].tolist() == [True, True, True, False]
    loss = aggregate_loss(losses, mask, "sequence")
    assert loss.item() == pytest.approx((-1.1 + math.exp(0.5)) / 2)
    loss.backward()
    # response 0 is clipped: no gradient; response 1: d/dlog pi of s_1 / 2, s_1 = exp(log pi / 1)
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, 0.0, 0.0], [math.exp(0.5) / 2, 0.0, 0.0]]))


# --- the shared prompt cache ----------------------------------------------------------------------


def test_group_sampling_shares_the_prompt_cache_and_equals_repeated_prompts_under_greedy():
    palm = tiny_palm().eval()
    prompts = [torch.tensor([EOS_ID, 84, 104, 101, 32]), torch.tensor([EOS_ID, 65]), torch.tensor([7, 8, 9])]
    repeated = [p for p in prompts for _ in range(3)]
    tokens, log_probs = palm.generate(24, prompt=prompts, temperature=0, num_samples_per_prompt=3, return_log_probs=True)
    alone, alone_log_probs = palm.generate(24, prompt=repeated, temperature=0, return_log_probs=True)
    assert tokens.shape == (9, 19) and torch.equal(tokens, alone)
    torch.testing.assert_close(log_probs, alone_log_probs)
    assert torch.equal(palm.generate(24, prompt=prompts, temperature=0, num_samples_per_prompt=3, use_cache=False), alone)
    # the prompt is encoded once: the first forward pass sees 3 rows, not 9
    rows = []
    forward = palm.forward
    palm.forward = lambda x, **kwargs: rows.append(x.shape[0]) or forward(x, **kwargs)
    palm.generate(24, prompt=prompts, temperature=0, num_samples_per_prompt=3)
    assert rows[0] == 3 and set(rows[1:]) == {9}


def test_samples_of_one_group_are_drawn_independently():
    palm = tiny_palm()
    torch.manual_seed(0)
    tokens = palm.generate(12, prompt=PROMPTS[0], num_samples_per_prompt=8)  # one prompt, 1-D: rows are its samples
    assert tokens.shape == (8, 8) and len({tuple(row.tolist()) for row in tokens}) > 1


# --- the trainer ----------------------------------------------------------------------------------


# the trainer's defaults before they became train_grpo.py's (GRPOConfig), which these tests were written against
BEFORE = dict(estimator="grpo", beta=0.04, kl_in="loss", lr=1e-4, prompts_per_step=16)


def trainer(palm=None, **kwargs):
    kwargs = dict(dict(reward_fn=count_target, prompt_token_ids=PROMPTS, group_size=4, minibatch_size=8, **BEFORE), **kwargs)
    return GRPOTrainer(palm=palm or tiny_palm(), **kwargs)


def perturbed(t):
    """The trainer with its actor's LoRA moved at random, away from the reference."""
    with torch.no_grad():
        for parameter in t.unwrapped.actor_parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return t


def count_reference_passes(palm) -> list:
    """Wraps palm.forward to record, for every call, whether it ran with the adapters disabled."""
    calls = []
    forward = palm.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("disable_lora", False))
        return forward(*args, **kwargs)

    palm.forward = counting
    return calls


def test_beta_zero_makes_no_reference_forward_pass():
    t = trainer(beta=0.0)
    calls = count_reference_passes(t.palm)
    stats, rollout = t.step(max_seq_len=12, prompts_per_step=2)
    assert calls and not any(calls) and rollout.ref_log_probs is None
    assert "kl" not in stats and "kl_loss" not in stats and all(math.isfinite(v) for v in stats.values())

    t = trainer(beta=0.04)
    calls = count_reference_passes(t.palm)
    stats, rollout = t.step(max_seq_len=12, prompts_per_step=2)
    assert sum(calls) == 1  # one reference pass over the whole rollout
    assert stats["kl"] == 0.0 and stats["kl_loss"] == 0.0  # the adapters start as a no-op


def test_the_adaptive_beta_moves_towards_the_kl_target_as_ppos_and_weighs_the_next_rollout():
    t = trainer(estimator="rloo", kl_in="reward", beta=0.5, kl_target=7.0, kl_horizon=100)
    stats, _ = t.step(max_seq_len=12, prompts_per_step=2)
    assert stats["kl"] == 0.0 and stats["beta"] == 0.5  # KL 0 (the adapters start as a no-op): beta falls by the cap
    assert t.kl.beta == pytest.approx(0.5 * (1 - 0.2 * 2 * 4 / 100))
    t.kl.beta = 3.0
    rollout, stats = perturbed(t).rollout(PROMPTS, max_seq_len=12)
    resp_mask = rollout.mask[:, rollout.start:]
    kl = ((rollout.log_probs - rollout.ref_log_probs) * resp_mask).sum(dim=1)
    prompt_mask = rollout.mask & (torch.arange(rollout.seq.shape[1]) < rollout.start)
    rewards = count_target(rollout.seq, prompt_mask, rollout.mask) - 3.0 * kl
    assert stats["beta"] == 3.0 and kl.abs().max() > 0
    torch.testing.assert_close(rollout.advantages, rloo_advantages(rewards.view(2, 4)).view(-1))
    for fixed in (trainer(beta=0.5, kl_target=None), trainer(beta=0.0, kl_target=7.0)):
        beta = fixed.kl.beta
        fixed.step(max_seq_len=12, prompts_per_step=2)
        assert fixed.kl.beta == beta


def test_the_linear_schedule_steps_at_the_remaining_share_of_the_starting_rate():
    t = trainer(lr=3e-3, iterations=3, lr_schedule="linear")
    rates = []
    for _ in range(3):
        t.step(max_seq_len=12, prompts_per_step=2)
        rates.append(t.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([3e-3, 2e-3, 1e-3])
    constant = trainer(lr=3e-3, iterations=3, lr_schedule="constant")
    for _ in range(2):
        constant.step(max_seq_len=12, prompts_per_step=2)
    assert constant.optimizer.param_groups[0]["lr"] == 3e-3


def test_the_response_budget_is_fixed_by_the_longest_prompt_not_by_each_batch():
    t = trainer(estimator="dr_grpo", loss_aggregation="constant", beta=0.0)
    short_only = [PROMPTS[1]] * 2  # 2 tokens; the trainer's longest prompt has 4
    for prompts in (PROMPTS, short_only):
        rollout, _ = t.rollout(prompts, max_seq_len=12)
        assert rollout.max_new_tokens == 12 - 4  # Dr. GRPO's constant, the same every iteration
        assert rollout.mask[:, rollout.start:].sum(dim=1).max() <= 8
    with pytest.raises(ValueError, match="the longest prompt has 4 tokens, so max_seq_len must be at least 5"):
        t.rollout(PROMPTS, max_seq_len=4)


def test_rollout_groups_and_advantages_by_hand():
    t = trainer(estimator="dr_grpo", beta=0.0)
    rollout, stats = t.rollout(PROMPTS, max_seq_len=12)
    seq, mask, start = rollout.seq, rollout.mask, rollout.start
    assert seq.shape[0] == 2 * 4 and start == 4 and rollout.max_new_tokens == 12 - 4
    assert torch.equal(seq[:4, :start], PROMPTS[0].expand(4, -1)) and (seq[4:, :2] == PAD_ID).all()
    prompt_mask = mask & (torch.arange(seq.shape[1]) < start)
    scores = count_target(seq, prompt_mask, mask).view(2, 4)
    torch.testing.assert_close(rollout.advantages, (scores - scores.mean(dim=1, keepdim=True)).view(-1))
    assert stats["score"] == pytest.approx(scores.mean().item())
    assert stats["zero_variance_groups"] == pytest.approx(float((scores == scores[:, :1]).all(dim=1).float().mean()))


def test_kl_in_the_reward_is_subtracted_before_the_group_baseline():
    t = perturbed(trainer(estimator="rloo", kl_in="reward", beta=0.5))
    rollout, stats = t.rollout(PROMPTS, max_seq_len=12)
    resp_mask = rollout.mask[:, rollout.start:]
    # the KL from forward passes of its own: the policy's scope and the base, not the rollout's tensors
    policy = t.palm.log_probs(rollout.seq, rollout.mask, finetune_scope="actor")[:, rollout.start - 1:]
    reference = t.palm.log_probs(rollout.seq, rollout.mask, disable_lora=True)[:, rollout.start - 1:]
    kl = ((policy - reference) * resp_mask).sum(dim=1)
    assert stats["kl"] == pytest.approx(kl.mean().item(), rel=1e-4) and kl.abs().max() > 0
    prompt_mask = rollout.mask & (torch.arange(rollout.seq.shape[1]) < rollout.start)
    rewards = count_target(rollout.seq, prompt_mask, rollout.mask) - 0.5 * kl
    torch.testing.assert_close(rollout.advantages, rloo_advantages(rewards.view(2, 4)).view(-1))


@pytest.mark.parametrize("estimator,kl_in,aggregation,ratio", [("grpo", "loss", "token", "token"), ("dr_grpo", "loss", "constant", "token"),
                                                               ("rloo", "reward", "sequence", "token"), ("grpo", "reward", "sequence", "sequence"),
                                                               ("reinforce_pp_baseline", "reward", "token", "token")])
def test_only_the_actor_adapters_move(estimator, kl_in, aggregation, ratio):
    palm = tiny_palm()
    reward_model = RewardModel(palm, num_binned_output=5)
    t = trainer(palm, reward_fn=None, reward_model=reward_model, estimator=estimator, kl_in=kl_in,
                loss_aggregation=aggregation, importance_ratio=ratio, lr=1e-2)
    before = {k: v.clone() for k, v in reward_model.state_dict().items()}
    history = t.train(num_episodes=16, max_seq_len=10, prompts_per_step=2)
    assert len(history) == 2
    for name, value in reward_model.state_dict().items():
        moved = not torch.equal(before[name], value)
        trained = ".finetune_modules.actor." in name
        if trained and name.endswith(".B"):
            assert moved, f"{name} did not move"
        if not trained:
            assert not moved, f"{name} moved"


def test_grpo_raises_the_reward():
    torch.manual_seed(0)
    t = trainer(group_size=8, lr=1e-2, minibatch_size=16)  # one update per iteration of 2 prompts x 8 samples
    history = t.train(num_episodes=16 * 20, max_seq_len=16, prompts_per_step=2)
    first, last = [sum(h["score"] for h in part) / 4 for part in (history[:4], history[-4:])]
    assert last > first + 0.75, (first, last)  # 'a' goes from ~0.1 to ~1.6 per response
    assert all(h["kl"] < 20 for h in history)


def test_text_rewards_best_of_n_and_the_merged_policy():
    t = perturbed(trainer(reward_fn=text_reward_fn(lambda texts: [text.count(chr(TARGET)) for text in texts])))
    stats, rollout = t.step(max_seq_len=12, prompts_per_step=2)
    prompt_mask = rollout.mask & (torch.arange(rollout.seq.shape[1]) < rollout.start)
    assert stats["score"] == pytest.approx(count_target(rollout.seq, prompt_mask, rollout.mask).mean().item())
    best, scores, index = t.generate(16, prompt="The", num_samples=8, return_scores=True)
    assert scores.shape == (8,) and scores[index] == scores.max()
    # the merged policy is RLHFTrainer's (tested in test_ppo.py), from the trained scope
    x = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(t.policy()(x), t.palm(x, finetune_scope="actor"), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(t.policy()(x), t.palm(x))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown estimator"):
        trainer(estimator="ppo")
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        trainer(estimator="rloo", group_size=1)
    with pytest.raises(ValueError, match="group_size 0: must be >= 1"):
        trainer(group_size=0)
    with pytest.raises(ValueError, match="kl_in"):
        trainer(kl_in="both")
    with pytest.raises(ValueError, match="loss_aggregation"):
        trainer(loss_aggregation="mean")
    with pytest.raises(ValueError, match="reward_model or reward_fn"):
        GRPOTrainer(palm=tiny_palm(), prompt_token_ids=PROMPTS)


def test_with_dropout_the_first_ratio_is_exactly_one_and_temperature_zero_is_refused():
    from palm_rlhf import PaLM, PaLMConfig
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", attn_dropout=0.3, ff_dropout=0.3))
    t = trainer(palm, epochs=1, minibatch_size=64)
    rollout, _ = t.rollout(PROMPTS * 2, max_seq_len=12)
    stats = t.learn(rollout)
    assert stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        t.step(max_seq_len=10, prompts_per_step=1, temperature=0.0)


# --- DAPO's dynamic sampling and overlong punishment -----------------------------------------------


def test_overlong_penalty_by_hand():
    # budget 10, buffer 4: free up to 6 tokens, then a quarter of a point per token, 1 at the budget
    lengths = torch.tensor([3, 6, 7, 8, 10])
    torch.testing.assert_close(overlong_penalty(lengths, budget=10, buffer=4), torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0]))
    t = trainer(estimator="rloo", kl_in="reward", beta=0.0, overlong_buffer=8)
    samples = t.draw_responses(PROMPTS, 12, 1.0, torch.Generator().manual_seed(0), group_size=4)
    lengths = samples.mask[:, samples.start:].sum(dim=1).float()
    torch.testing.assert_close(t.rewards(samples), samples.scores - lengths / 8)  # budget 12 - 4 = 8 = the buffer


def test_chosen_groups_take_the_informative_ones_first_in_the_order_drawn():
    informative = torch.tensor([False, True, False, True, True])
    assert chosen_groups(informative, 2).tolist() == [1, 3]
    assert chosen_groups(informative, 4).tolist() == [0, 1, 3, 4]  # too few: the first equal-score group fills in


def test_merged_rounds_keep_every_response_and_its_log_probs():
    t = trainer(beta=0.04)
    long_prompt = t.draw_responses([PROMPTS[0]], 12, 1.0, torch.Generator().manual_seed(0), group_size=2)
    short_prompt = t.draw_responses([PROMPTS[1]], 12, 1.0, torch.Generator().manual_seed(1), group_size=2)
    merged = merge_samples([short_prompt, long_prompt], PAD_ID)
    assert merged.start == 4 and short_prompt.start == 2
    for rows, part in ((slice(0, 2), short_prompt), (slice(2, 4), long_prompt)):
        assert [s[m].tolist() for s, m in zip(merged.seq[rows], merged.mask[rows])] == [s[m].tolist() for s, m in zip(part.seq, part.mask)]
        assert torch.equal(merged.scores[rows], part.scores)
        alone, together = t.forward_passes(part, 1.0), t.forward_passes(merged, 1.0)
        width = alone.log_probs.shape[1]
        mask = part.mask[:, part.start:]
        for name in ("log_probs", "ref_log_probs"):
            torch.testing.assert_close(getattr(together, name)[rows, :width][mask], getattr(alone, name)[mask], atol=1e-5, rtol=1e-5)


def one_prompt_informative(seq, prompt_mask, mask):
    """0 for every response to the 4-token prompt; the sum of the response's token ids (which differ
    between samples) for the 2-token one."""
    varied = (seq * (mask & ~prompt_mask)).sum(dim=1).float()
    return torch.where(prompt_mask.sum(dim=1) == 4, 0.0, varied)


def test_dynamic_sampling_replaces_equal_score_groups_and_keeps_the_batch_size():
    t = trainer(reward_fn=one_prompt_informative, estimator="rloo", kl_in="reward", beta=0.0, dynamic_sampling=True,
                max_sampling_rounds=10)
    prompts, generator = t.draw_prompts(2)
    rollout, stats = t.rollout(prompts, max_seq_len=12, generator=generator)
    prompt_mask = rollout.mask & (torch.arange(rollout.seq.shape[1]) < rollout.start)
    scores = one_prompt_informative(rollout.seq, prompt_mask, rollout.mask).view(2, 4)
    assert len(rollout.seq) == 8 and (prompt_mask.sum(dim=1) == 2).all()  # only the short prompt's groups
    assert (scores != scores[:, :1]).any(dim=1).all() and stats["extra_samples"] % 4 == 0
    policy, _ = t.unwrapped(rollout.seq, rollout.mask, rollout.start, 1.0)
    assert torch.equal(rollout.log_probs, policy)  # recomputed on the merged batch: the first ratio is exactly 1

    # no informative group at all: each later round draws the whole batch again, then it is kept
    t = trainer(reward_fn=lambda seq, prompt_mask, mask: torch.zeros(len(seq)), estimator="rloo", kl_in="reward",
                beta=0.0, dynamic_sampling=True, max_sampling_rounds=3)
    stats, rollout = t.step(max_seq_len=12, prompts_per_step=2)
    assert len(rollout.seq) == 8 and stats["extra_samples"] == (3 - 1) * 2 * 4 and stats["zero_variance_groups"] == 1.0

    # one round is no dynamic sampling at all
    plain, once = (trainer(estimator="rloo", kl_in="reward", beta=0.0, **kw).step(max_seq_len=12, prompts_per_step=2)[1]
                   for kw in (dict(), dict(dynamic_sampling=True, max_sampling_rounds=1)))
    assert torch.equal(plain.seq, once.seq) and torch.equal(plain.advantages, once.advantages)
