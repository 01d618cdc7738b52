"""Code written for PaLM-rlhf-pytorch runs here with the package name changed (issue 12, section 1).

Each test runs that package's README usage, on tiny shapes, and checks what it does.
"""
import warnings

import pytest
import torch

from palm_rlhf import ActorCritic, ImplicitPRM, PaLM, RewardModel, RLHFTrainer
from palm_rlhf.generate import top_k_top_p_filter

SHAPE = dict(dim=32, depth=2, heads=2, dim_head=16)


def seed_palm(num_tokens=20000, **kwargs):
    torch.manual_seed(0)
    return PaLM(num_tokens=num_tokens, **SHAPE, **kwargs)


def test_top_level_exports_are_the_components():
    from palm_rlhf.implicit_prm import ImplicitPRM as implicit_prm
    from palm_rlhf.ppo import ActorCritic as actor_critic, RLHFTrainer as rlhf_trainer
    from palm_rlhf.reward import RewardModel as reward_model
    assert (RewardModel, RLHFTrainer, ActorCritic, ImplicitPRM) == (reward_model, rlhf_trainer, actor_critic, implicit_prm)


def test_palm_flash_attn_and_return_loss():
    palm = seed_palm(flash_attn=True)
    seq = torch.randint(0, 20000, (1, 33))
    loss = palm(seq, return_loss=True)
    loss.backward()
    logits = palm(seq[:, :-1]).detach()
    expected = torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], ignore_index=0)
    torch.testing.assert_close(loss.detach(), expected)


def test_causal_false_is_bidirectional():
    causal, bidirectional = seed_palm(), seed_palm(causal=False)
    seq = torch.randint(1, 20000, (2, 10))
    changed = seq.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 20000
    torch.testing.assert_close(causal(seq)[:, 0], causal(changed)[:, 0])
    assert not torch.allclose(bidirectional(seq)[:, 0], bidirectional(changed)[:, 0])
    # and generation still works, re-reading the whole sequence at each step
    assert bidirectional.generate(8, prompt=seq[0, :4]).shape == (4,)


def test_generate_without_a_prompt_returns_seq_len_tokens():
    palm = seed_palm()
    out = palm.generate(16)
    assert out.shape == (1, 16) and out[0, 0] != palm.pad_id


def test_filter_thres_is_a_top_k_fraction():
    palm = seed_palm()
    prompt = torch.randint(1, 20000, (12,))
    # ceil((1 - 0.99999) * 20000) = 1 token kept: greedy
    assert torch.equal(palm.generate(24, prompt=prompt, filter_thres=0.99999), palm.generate(24, prompt=prompt, temperature=0.0))


def test_filter_logits_fn_gets_the_logits_and_thres():
    palm = seed_palm()
    seen = []

    def only_token_7(logits, thres=0.9):
        seen.append(thres)
        return torch.full_like(logits, float("-inf")).index_fill(-1, torch.tensor([7]), 0.0)

    out = palm.generate(10, prompt=torch.tensor([5, 6]), filter_logits_fn=only_token_7, filter_thres=0.5)
    assert (out == 7).all() and seen == [0.5] * 8
    palm.generate(4, prompt=torch.tensor([5, 6]), filter_logits_fn=lambda logits, thres: top_k_top_p_filter(logits, None, thres))


def test_use_tqdm_shows_the_steps(capsys):
    seed_palm().generate(10, prompt=torch.tensor([5, 6]), use_tqdm=True)
    assert "generate:" in capsys.readouterr().err


def test_pad_value_is_written_after_eos():
    palm = seed_palm()
    prompt = torch.tensor([5, 6, 9])
    eos = int(palm.generate(4, prompt=prompt, temperature=0.0)[0])  # the greedy first token ends the text
    out = palm.generate(12, prompt=prompt, temperature=0.0, eos_token=eos, pad_value=3)
    assert out[0] == eos and (out[1:] == 3).all()


def test_seq_len_not_above_the_prompt_says_what_to_pass():
    with pytest.raises(ValueError, match=r"pass seq_len=7 for one new token"):
        seed_palm().generate(6, prompt=torch.randint(1, 20000, (6,)))


def test_reward_model_binned_with_prompt_mask_labels_and_prompt_lengths():
    palm = seed_palm(causal=False)
    reward_model = RewardModel(palm, num_binned_output=5)
    seq = torch.randint(1, 20000, (2, 24))
    prompt_mask = torch.arange(24)[None].expand(2, 24) < torch.tensor([[4], [9]])
    labels = torch.randint(0, 5, (2,))
    loss = reward_model(seq, prompt_mask=prompt_mask, labels=labels)
    loss.backward()
    reward_model.eval()
    reward = reward_model(seq, prompt_mask=prompt_mask)
    assert reward.shape == (2,) and ((reward >= 1) & (reward <= 5)).all()
    torch.testing.assert_close(reward_model(seq, prompt_lengths=torch.tensor([4, 9])), reward)
    with pytest.raises(ValueError, match="not both"):
        reward_model(seq, prompt_mask=prompt_mask, prompt_lengths=torch.tensor([4, 9]))


def test_reward_model_sampling_keywords_are_accepted_with_one_warning():
    with pytest.warns(UserWarning, match="sample_from_bins .*expected rating") as record:
        RewardModel(seed_palm(), num_binned_output=5, sample_from_bins=True, sample_temperature=1.0)
    assert len(record) == 1


def test_training_the_palm_after_building_a_reward_model_says_why_and_what_to_do():
    palm = seed_palm()
    RewardModel(palm, num_binned_output=5)
    seq = torch.randint(1, 20000, (2, 16))
    loss = palm(seq, return_loss=True)
    assert torch.isfinite(loss)  # evaluating it is fine
    with pytest.raises(RuntimeError, match=r"base weights are frozen.*share_base=False"):
        loss.backward()

    palm = seed_palm()
    RewardModel(palm, num_binned_output=5, share_base=False)  # a copy, as PaLM-rlhf-pytorch
    palm(seq, return_loss=True).backward()
    assert palm.token_emb.weight.grad is not None


def seed_trainer(palm, **kwargs):
    reward_model = RewardModel(palm, num_binned_output=5)
    prompt_token_ids = torch.tensor([[11, 256, 12, 0, 0], [13, 14, 15, 16, 17]])  # zero-padded, as there
    return RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompt_token_ids, **kwargs)


def test_rlhf_trainer_takes_the_seed_keywords():
    palm = seed_palm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every keyword here has a meaning: no warning
        trainer = seed_trainer(palm, actor_lr=3e-4, critic_lr=2e-4, max_norm=0.5, minibatch_size=4, epochs=2,
                               kl_div_loss_weight=0.07, beta_s=0.01, actor_wd=0.1, critic_wd=0.2,
                               betas=(0.9, 0.999), eps_clip=0.3, value_clip=0.5)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [3e-4, 2e-4]
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.2]
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    c = trainer.config
    assert (c.max_grad_norm, c.minibatch_size, c.epochs) == (0.5, 4, 2)
    assert (trainer.kl.beta, c.entropy_coef, c.eps_clip, c.value_clip) == (0.07, 0.01, 0.3, 0.5)
    # the zero padding is dropped (pad_value=0, this vocabulary's pad), token 256 is a real token
    assert [p.tolist() for p in trainer.prompts] == [[11, 256, 12], [13, 14, 15, 16, 17]]


def test_rlhf_trainer_meaningless_keywords_give_one_warning_naming_each():
    with pytest.warns(UserWarning) as record:
        seed_trainer(seed_palm(), actor_dropout=0.1, critic_num_pred_bins=6, critic_pooled_values=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert all(k in message for k in ("actor_dropout", "critic_num_pred_bins", "critic_pooled_values", "no meaning"))
    with pytest.raises(TypeError, match="not both"):
        seed_trainer(seed_palm(), kl_div_loss_weight=0.1, beta=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        seed_trainer(seed_palm(), kl_div_loss_wieght=0.1)


def test_rlhf_trainer_prompts_path(tmp_path):
    (tmp_path / "prompts.txt").write_text("The movie\nA film\n")
    trainer = RLHFTrainer(palm=PaLM(**SHAPE), reward_fn=lambda seq, prompt_mask, mask: seq.float().mean(1),
                          prompts_path=str(tmp_path / "prompts.txt"))
    assert len(trainer.prompts) == 2


def test_train_maps_episodes_timesteps_and_updates():
    trainer = seed_trainer(seed_palm(), minibatch_size=4, epochs=1)
    iterations = []
    with pytest.warns(UserWarning, match="max_batch_size") as record:
        history = trainer.train(num_episodes=2, max_timesteps=4, update_timesteps=4, max_batch_size=4,
                                max_seq_len=12, eos_token=1, temperature=0.9,
                                callback=lambda i, stats, rollout: iterations.append(rollout))
    assert len(record) == 1
    # 2 episodes x 4 timesteps = 8 responses, a PPO update on every 4 of them
    assert len(history) == 2 and all(len(r.seq) == 4 for r in iterations)
    assert trainer.eos_id == 1 and iterations[0].temperature == 0.9
    with pytest.raises(ValueError, match="no PPO update would run"):
        trainer.train(num_episodes=1, max_timesteps=3, update_timesteps=4)


@pytest.mark.slow
def test_trainer_generate_best_of_n():
    trainer = seed_trainer(seed_palm())
    prompt = torch.tensor([11, 12, 13])
    best, scores, index = trainer.generate(2048, prompt=prompt, num_samples=10, return_scores=True)
    assert torch.equal(best[:3], prompt) and len(best) == 2048  # no EOS in this vocabulary: full length
    assert scores.shape == (10,) and scores[index] == scores.max()
    assert trainer.generate(64, prompt=prompt, num_samples=10).ndim == 1
