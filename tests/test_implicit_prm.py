import pytest
import torch
from test_ppo import PROMPTS, tiny_palm

from palm_rlhf import ImplicitPRM, RLHFTrainer
from palm_rlhf.reward import encode_reward_input, pad_right


def batch(responses, prompt="The"):
    return pad_right(*zip(*(encode_reward_input(prompt, r) for r in responses)))


def perturb(prm, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prm.finetune_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


def test_rewards_are_zero_at_init_and_only_on_response_tokens():
    prm = ImplicitPRM(tiny_palm(), beta=0.1)
    seq, prompt_mask, mask = batch([" good", " a longer response"])
    assert (prm(seq, prompt_mask=prompt_mask, mask=mask) == 0).all()
    perturb(prm)
    rewards = prm(seq, prompt_mask=prompt_mask, mask=mask)  # (b, n - 1), for the tokens seq[:, 1:]
    rewarded = (mask & ~prompt_mask)[:, 1:]
    assert (rewards[~rewarded] == 0).all() and (rewards[rewarded] != 0).all()
    with torch.no_grad():
        policy = prm.palm.log_probs(seq, mask, finetune_scope="prm")
        reference = prm.palm.log_probs(seq, mask, disable_lora=True)
    torch.testing.assert_close(rewards, 0.1 * (policy - reference) * rewarded)
    torch.testing.assert_close(prm.score(seq, prompt_mask, mask), rewards.sum(dim=1))


def test_loss_is_the_cross_entropy_of_the_summed_reward():
    prm = ImplicitPRM(tiny_palm(), beta=0.1)
    perturb(prm)
    seq, prompt_mask, mask = batch([" yes", " no", " maybe"])
    labels = torch.tensor([1, 0, 1])
    r = prm.score(seq, prompt_mask, mask)
    expected = -(labels * torch.sigmoid(r).log() + (1 - labels) * torch.sigmoid(-r).log()).mean()
    torch.testing.assert_close(prm(seq, labels, prompt_mask=prompt_mask, mask=mask), expected)


def test_training_on_outcome_labels_raises_the_reward_of_good_responses():
    prm = ImplicitPRM(tiny_palm(), beta=0.1)
    good, bad = [" aaaa", " aaa a"], [" zzzz", " zz zz"]
    seq, prompt_mask, mask = batch(good + bad)
    labels = torch.tensor([1, 1, 0, 0])
    optimizer = torch.optim.Adam(prm.finetune_parameters(), lr=1e-2)
    base = {k: v.clone() for k, v in prm.palm.state_dict().items() if not k.startswith("finetune_modules.")}
    for _ in range(10):
        loss = prm(seq, labels, prompt_mask=prompt_mask, mask=mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    held_out = batch([" aa aa", " zzz z"], prompt="A")
    score = prm.score(held_out[0], held_out[1], held_out[2])
    assert score[0] > 0 > score[1], score
    assert all(torch.equal(v, prm.palm.state_dict()[k]) for k, v in base.items())  # the reference stays


def test_ppo_uses_the_dense_token_rewards():
    palm = tiny_palm()
    prm = ImplicitPRM(palm, beta=0.1)
    perturb(prm)
    trainer = RLHFTrainer(palm=palm, reward_model=prm, prompt_token_ids=PROMPTS, beta=0.0, gamma=1.0, lam=1.0,
                          minibatch_size=8, epochs=1)
    rollout, stats = trainer.rollout(PROMPTS * 2, max_seq_len=12)
    resp_mask = rollout.mask[:, rollout.start:]
    prompt_mask = (torch.arange(rollout.seq.shape[1]) < rollout.start) & rollout.mask
    with torch.no_grad():
        dense = prm.token_rewards(rollout.seq, prompt_mask, rollout.mask)[:, rollout.start - 1:] * resp_mask
    # values start at 0 and gamma = lambda = 1: the returns are each token's reward-to-go
    reward_to_go = dense.flip(1).cumsum(1).flip(1) * resp_mask
    torch.testing.assert_close(rollout.returns, reward_to_go)
    assert (dense[resp_mask] != 0).all()
    assert stats["score"] == pytest.approx(dense.sum(dim=1).mean().item(), abs=1e-5)
    trainer.learn(rollout)  # and the update runs


def test_as_a_critic_or_with_a_separate_reference_it_says_what_to_do():
    palm = tiny_palm()
    prm = ImplicitPRM(palm)
    with pytest.raises(ValueError, match="pass it as reward_model="):
        RLHFTrainer(palm=palm, reward_model=prm, critic=prm, prompt_token_ids=PROMPTS)
    with pytest.raises(ValueError, match="pass no ref_model"):
        ImplicitPRM(tiny_palm(), ref_model=tiny_palm())
