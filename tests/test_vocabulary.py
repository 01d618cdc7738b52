"""The pad id is never a real token, whatever the vocabulary (issue 12, section 2)."""
import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import PaLM, PaLMConfig, RewardModel, RLHFTrainer
from palm_rlhf.tokenizer import PAD_ID

SHAPE = dict(dim=32, depth=2, heads=2, dim_head=16)


def model(num_tokens=20000, **kwargs):
    torch.manual_seed(0)
    return PaLM(num_tokens=num_tokens, **SHAPE, **kwargs)


def test_pad_id_is_the_byte_pad_for_bytes_zero_otherwise_or_as_given():
    assert PaLMConfig.from_name("tiny").pad_id == PAD_ID == 256
    assert PaLMConfig.from_name("tiny", num_tokens=20000).pad_id == 0
    assert model().pad_id == 0 and model(pad_id=19999).pad_id == 19999
    assert model(cross_entropy_ignore_index=5).pad_id == 5  # PaLM-rlhf-pytorch's name for it
    with pytest.raises(ValueError, match=r"pad_id must be a token id in \[0, 300\)"):
        PaLM(num_tokens=300, pad_id=300, **SHAPE)


def test_saved_pad_id_comes_back(tmp_path):
    model(pad_id=7).save(tmp_path / "m")
    assert PaLM.from_pretrained(tmp_path / "m").pad_id == 7


def test_lm_loss_ignores_the_pad_and_counts_token_256():
    palm = model()
    seq = torch.tensor([[5, 256, 256, 9, 0, 0]])
    logits = palm(seq[:, :-1]).detach()
    targets = seq[0, 1:]
    real = targets != 0
    expected = F.cross_entropy(logits[0][real], targets[real])
    torch.testing.assert_close(palm(seq, return_loss=True).detach(), expected)


def test_reward_model_pads_with_the_pad_and_reads_token_256():
    palm = model()
    reward_model = RewardModel(palm, num_binned_output=5).eval()  # no dropout on the pooled embedding
    with torch.no_grad():
        reward_model.to_pred.weight.normal_()  # a head that is not ~0, so the tokens read show
        seq = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 256, 256]])
        reward = reward_model(seq)
        torch.testing.assert_close(reward[0], reward_model(seq[:1, :3])[0])  # zeros are padding
        assert reward[1] != reward[0]  # 256 is text
        # the pairwise loss pads its batch with the model's pad too
        reward_model.pairwise_loss(seq[1:], seq[:1])


def test_a_20000_token_model_end_to_end():
    palm = model()
    palm(torch.randint(1, 20000, (2, 16)), return_loss=True).backward()
    reward_model = RewardModel(palm, num_binned_output=5)
    prompts = torch.tensor([[11, 256, 12, 0], [13, 14, 15, 16]])
    trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=prompts, minibatch_size=4, epochs=1)
    assert trainer.tokenizer is None and trainer.eos_id is None  # the byte tokenizer does not fit this vocabulary
    eos = 256
    rollouts = []
    trainer.train(num_episodes=4, rollout_batch_size=4, max_seq_len=10, eos_token=eos,
                  callback=lambda i, stats, rollout: rollouts.append((stats, rollout)))
    stats, rollout = rollouts[0]
    response, real = rollout.seq[:, rollout.start:], rollout.mask[:, rollout.start:]
    assert (response[~real] == 0).all()  # after EOS: the pad
    ended = ((response == eos) & real).any(dim=1)
    assert stats["ended_with_eos"] == ended.float().mean().item()
    assert stats["approx_kl"] == 0.0  # one iteration, one minibatch: ratio 1
    out = palm.generate(12, prompt=prompts[1], eos_token=13, finetune_scope="actor", temperature=0.0)
    assert out.shape == (8,)
    with pytest.raises(ValueError, match="need a tokenizer"):
        RLHFTrainer(palm=palm, reward_model=reward_model, prompts=["some text"])
