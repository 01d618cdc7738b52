import math

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.reward import (
    RewardEnsemble,
    RewardModel,
    all_pairs_bradley_terry_loss,
    bradley_terry_loss,
    binned_rating_loss,
    encode_reward_input,
    expected_rating,
    last_token_index,
    pad_right,
    split_prompt,
)
from palm_rlhf.tokenizer import EOS_ID, PAD_ID


def tiny_palm(seed=0):
    torch.manual_seed(seed)
    return PaLM.from_config(PaLMConfig.from_name("tiny"))


def perturb_trainable(model, seed=1):
    """Random values for the trainable part, so tests do not pass just because LoRA B = 0 and the
    segment embeddings are zero at init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.finetune_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def batch(pairs):
    return pad_right(*zip(*(encode_reward_input(p, r) for p, r in pairs)))


TEXTS = [("The movie is", " a delight from start to finish."), ("Dull", " and long."), ("", " Superb!")]


def test_bradley_terry_loss_against_hand_computed_values():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(x) = log(1 + e^-x)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    with_margin = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert bradley_terry_loss(r_chosen, r_rejected, margin=1.0).item() == pytest.approx(with_margin, rel=1e-6)
    per_pair = bradley_terry_loss(r_chosen, r_rejected, margin=torch.tensor([1.0, 0.0]))
    assert per_pair.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2, rel=1e-6)


def test_all_pairs_loss_uses_every_pair_far_enough_apart():
    rewards = torch.tensor([1.0, 0.0, 3.0, -1.0])
    ratings = torch.tensor([2.0, 0.8, 1.5, -3.0])
    # pairs with rating gap >= 1 (preferred first): (0,1), (0,3), (1,3), (2,3); (0,2) and (1,2) are too close
    pairs = [(0, 1), (0, 3), (1, 3), (2, 3)]
    expected = sum(math.log(1 + math.exp(-(rewards[i] - rewards[j]).item())) for i, j in pairs) / len(pairs)
    assert all_pairs_bradley_terry_loss(rewards, ratings, min_gap=1.0).item() == pytest.approx(expected, rel=1e-6)
    chosen, rejected = zip(*pairs)
    same_as_pairs = bradley_terry_loss(rewards[list(chosen)], rewards[list(rejected)], margin=0.5)
    assert all_pairs_bradley_terry_loss(rewards, ratings, min_gap=1.0, margin=0.5).item() == pytest.approx(same_as_pairs.item())
    # no pair far enough apart: zero loss that still backpropagates (a DDP rank must not skip backward)
    rewards.requires_grad_(True)
    loss = all_pairs_bradley_terry_loss(rewards, torch.zeros(4), min_gap=1.0)
    loss.backward()
    assert loss.item() == 0.0 and rewards.grad.abs().sum() == 0


def test_binned_loss_and_expected_rating_against_hand_computed_values():
    logits = torch.tensor([[0.0, 0.0, math.log(2)]])  # probabilities 1/4, 1/4, 1/2
    assert binned_rating_loss(logits, torch.tensor([2])).item() == pytest.approx(math.log(2), rel=1e-6)
    assert binned_rating_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log(4), rel=1e-6)
    assert expected_rating(logits).item() == pytest.approx(1 * 0.25 + 2 * 0.25 + 3 * 0.5)


def test_sequences_are_eos_prompt_response_eos():
    seq, prompt_mask = encode_reward_input("ab", "cd")
    assert seq.tolist() == [EOS_ID, 97, 98, 99, 100, EOS_ID]
    assert prompt_mask.tolist() == [True, True, True, False, False, False]
    cut, _ = encode_reward_input("ab", "cdefgh", max_len=6)
    assert cut.tolist() == [EOS_ID, 97, 98, 99, 100, EOS_ID]
    with pytest.raises(ValueError, match="no room"):
        encode_reward_input("abcdef", "x", max_len=6)


def test_split_prompt_matches_review_prompts_words():
    assert split_prompt("the  movie is\tvery good indeed", 4) == ("the movie is very", " good indeed")
    assert split_prompt("too short", 4) == ("too", " short")
    assert split_prompt("one", 4) == ("", "one")


def test_last_token_index_with_left_and_right_padding():
    mask = torch.tensor([[True, True, False], [False, True, True], [False, True, False]])
    assert last_token_index(mask).tolist() == [1, 2, 1]


@pytest.mark.parametrize("pool", ["mean", "eos"])
@pytest.mark.parametrize("num_binned_output", [0, 5])
def test_padding_never_changes_a_score(num_binned_output, pool):
    model = RewardModel(tiny_palm(), num_binned_output=num_binned_output, pool=pool).eval()
    perturb_trainable(model)
    alone = torch.cat([model.score(*batch([pair])[:2]) for pair in TEXTS])
    seq, prompt_mask, mask = batch(TEXTS)  # right-padded to the longest, different amounts
    torch.testing.assert_close(model.score(seq, prompt_mask=prompt_mask, mask=mask), alone, atol=1e-5, rtol=1e-5)

    # left padding, different amounts per row, plus extra right padding on every row
    left = torch.tensor([3, 0, 7])
    width = seq.shape[1] + 7 + 2
    padded = torch.full((3, width), PAD_ID)
    padded_prompt = torch.zeros(3, width, dtype=torch.bool)
    for i in range(3):
        n = int(mask[i].sum())
        padded[i, left[i] : left[i] + n] = seq[i, :n]
        padded_prompt[i, left[i] : left[i] + n] = prompt_mask[i, :n]
    torch.testing.assert_close(model.score(padded, prompt_mask=padded_prompt), alone, atol=1e-5, rtol=1e-5)


def test_each_pool_reads_what_it_says():
    model = RewardModel(tiny_palm(), pool="mean").eval()
    perturb_trainable(model)
    seq, prompt_mask, mask = batch(TEXTS)
    segment = torch.where(prompt_mask[..., None], model.prompt_embed, model.response_embed)
    embeds = model.palm(seq, mask=mask, finetune_scope="reward", return_only_embedding=True, extra_embed=segment)
    by_hand = torch.stack([embeds[i, mask[i]].mean(dim=0) for i in range(len(seq))])
    torch.testing.assert_close(model.score(seq, prompt_mask=prompt_mask, mask=mask), model.to_pred(by_hand).squeeze(-1))
    model.pool = "eos"
    last = torch.stack([embeds[i, mask[i]][-1] for i in range(len(seq))])
    torch.testing.assert_close(model.score(seq, prompt_mask=prompt_mask, mask=mask), model.to_pred(last).squeeze(-1))
    with pytest.raises(ValueError, match="pool must be"):
        RewardModel(tiny_palm(), pool="max")


def test_the_model_knows_the_prompt_response_split():
    model = RewardModel(tiny_palm()).eval()
    perturb_trainable(model)
    seq, prompt_mask, mask = batch(TEXTS[:1])
    assert not torch.allclose(model.score(seq, prompt_mask=prompt_mask), model.score(seq, prompt_mask=~prompt_mask & mask))


def test_forward_returns_loss_with_labels_reward_without():
    model = RewardModel(tiny_palm(), num_binned_output=5).eval()
    perturb_trainable(model)
    seq, prompt_mask, mask = batch(TEXTS)
    logits = model(seq, mask=mask, prompt_mask=prompt_mask, return_logits=True)
    assert logits.shape == (3, 5)
    labels = torch.tensor([4, 0, 2])
    torch.testing.assert_close(model(seq, mask=mask, prompt_mask=prompt_mask, labels=labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(model(seq, mask=mask, prompt_mask=prompt_mask), expected_rating(logits))

    scalar = RewardModel(tiny_palm(), num_binned_output=0).eval()
    rewards = scalar.score(seq, prompt_mask=prompt_mask, mask=mask)
    assert rewards.shape == (3,)
    targets = torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(scalar(seq, mask=mask, prompt_mask=prompt_mask, labels=targets), F.mse_loss(rewards, targets))


def test_pairwise_loss_method_equals_bradley_terry_on_scores():
    model = RewardModel(tiny_palm()).eval()
    perturb_trainable(model)
    chosen, chosen_prompt, chosen_mask = batch(TEXTS[:2])
    rejected, rejected_prompt, rejected_mask = batch([("Meh", " no."), ("A", " long dull film, oh so long.")])
    loss = model.pairwise_loss(chosen, rejected, chosen_prompt, rejected_prompt, chosen_mask, rejected_mask, margin=0.5)
    expected = bradley_terry_loss(model.score(chosen, chosen_prompt, chosen_mask),
                                  model.score(rejected, rejected_prompt, rejected_mask), margin=0.5)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tuning", [dict(use_lora=True), dict(finetune_last_n_layers=1)])
def test_only_the_reward_head_segment_embeddings_and_scope_move(tuning):
    palm = tiny_palm()
    palm.add_finetune_params("actor", lora_r=4)  # another role's scope on the same base
    model = RewardModel(palm, num_binned_output=5, **tuning)
    assert palm.finetune_parameters("actor")[0].requires_grad  # the reward model leaves it alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.finetune_parameters(), lr=1e-2)
    seq, prompt_mask, mask = batch(TEXTS)
    for _ in range(3):
        model(seq, mask=mask, prompt_mask=prompt_mask, labels=torch.tensor([4, 0, 2])).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    meant_to_move = {k for k in before if k.startswith(("to_pred.", "prompt_embed", "response_embed",
                                                          "palm.finetune_modules.reward."))}
    assert moved == meant_to_move
    assert all(p.grad is None for name, p in palm.named_parameters() if not name.startswith("finetune_modules.reward."))


def synthetic_ratings(n, generator):
    """A rating task: the response is a letter repeated; its rating is which letter (a..e -> 0..4)."""
    labels = torch.randint(0, 5, (n,), generator=generator)
    lengths = torch.randint(3, 12, (n,), generator=generator)
    texts = [("Rate:", " " + "abcde"[int(k)] * int(length)) for k, length in zip(labels, lengths)]
    return batch(texts), labels


def test_reward_model_learns_a_tiny_rating_task_well_above_chance():
    generator = torch.Generator().manual_seed(0)
    model = RewardModel(tiny_palm(), num_binned_output=5, lora_r=8)
    optimizer = torch.optim.AdamW(model.finetune_parameters(), lr=1e-2)
    for _ in range(30):
        (seq, prompt_mask, mask), labels = synthetic_ratings(16, generator)
        model(seq, mask=mask, prompt_mask=prompt_mask, labels=labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    (seq, prompt_mask, mask), labels = synthetic_ratings(200, generator)
    with torch.no_grad():
        predicted = model.eval()(seq, mask=mask, prompt_mask=prompt_mask, return_logits=True).argmax(dim=-1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy > 0.6, f"accuracy {accuracy:.2f}, chance is 0.2"


def test_save_and_load_alone_or_onto_the_same_base(tmp_path):
    palm = tiny_palm()
    model = RewardModel(palm, num_binned_output=5).eval()
    perturb_trainable(model)
    seq, prompt_mask, mask = batch(TEXTS)
    expected = model.score(seq, prompt_mask, mask)
    model.save(tmp_path / "rm")

    alone = RewardModel.from_pretrained(tmp_path / "rm").eval()
    torch.testing.assert_close(alone.score(seq, prompt_mask, mask), expected)

    policy = PaLM.from_pretrained(tmp_path / "rm" / "base")  # e.g. PPO's base, already with its scopes
    policy.add_finetune_params("actor", lora_r=4)
    shared = RewardModel.from_pretrained(tmp_path / "rm", palm=policy).eval()
    assert shared.palm is policy and "actor" in policy.finetune_modules
    torch.testing.assert_close(shared.score(seq, prompt_mask, mask), expected)

    with pytest.raises(ValueError, match="another base PaLM"):
        RewardModel.from_pretrained(tmp_path / "rm", palm=tiny_palm(seed=1))
    with pytest.raises(FileNotFoundError, match="no reward model"):
        RewardModel.from_pretrained(tmp_path / "missing")


def test_whole_model_fine_tuning_saves_the_tuned_base(tmp_path):
    model = RewardModel(tiny_palm(), use_lora=False).eval()
    assert len(model.finetune_parameters()) == len(list(model.parameters()))
    with torch.no_grad():
        model.palm.layers[0].fused_in.weight.mul_(2)
    seq, prompt_mask, mask = batch(TEXTS)
    model.save(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    torch.testing.assert_close(loaded.score(seq, prompt_mask, mask), model.score(seq, prompt_mask, mask))


def two_saved_reward_models(tmp_path):
    """Two reward models on one base, as two seeds of train_reward.py leave them, and a fresh base."""
    palm = tiny_palm()
    for seed in (1, 2):
        model = RewardModel(palm, share_base=False).eval()
        perturb_trainable(model, seed=seed)
        model.save(tmp_path / f"rm{seed}")
    return [tmp_path / "rm1", tmp_path / "rm2"], PaLM.from_pretrained(tmp_path / "rm1" / "base")


def test_reward_models_share_one_base_under_their_own_scopes(tmp_path):
    paths, palm = two_saved_reward_models(tmp_path)
    seq, prompt_mask, mask = batch(TEXTS)
    alone = [RewardModel.from_pretrained(p).eval().score(seq, prompt_mask, mask) for p in paths]
    shared = [RewardModel.from_pretrained(p, palm=palm, scope=f"reward_{i}").eval() for i, p in enumerate(paths)]
    assert {"reward_0", "reward_1"} <= set(palm.finetune_modules)
    for model, expected in zip(shared, alone):
        torch.testing.assert_close(model.score(seq, prompt_mask, mask), expected)
    assert not torch.allclose(alone[0], alone[1])


@pytest.mark.parametrize("combine", ["mean", "min", "uwo"])
def test_ensemble_standardises_then_combines_as_coste_et_al(tmp_path, combine):
    paths, palm = two_saved_reward_models(tmp_path)
    members = [RewardModel.from_pretrained(p, palm=palm, scope=f"reward_{i}") for i, p in enumerate(paths)]
    ensemble = RewardEnsemble(members, combine=combine, uncertainty_weight=0.5).eval()
    calibration = batch(TEXTS * 2 + [("A", " film."), ("It", " was fine, I suppose.")])
    ensemble.calibrate(*calibration, batch_size=3)
    raw = torch.stack([m.score(*calibration) for m in members])  # (2, 8)
    torch.testing.assert_close(ensemble.shift, raw.mean(dim=1))
    z = (raw - raw.mean(dim=1, keepdim=True)) / raw.std(dim=1, keepdim=True)
    expected = {"mean": z.mean(0), "min": z.min(0).values, "uwo": z.mean(0) - 0.5 * ((z[0] - z[1]) / 2) ** 2}[combine]
    torch.testing.assert_close(ensemble.score(*calibration), expected)
    if combine == "mean":
        assert abs(ensemble.score(*calibration).mean()) < 1e-5  # standardised members average 0 on calibration
    with pytest.raises(ValueError, match="combine must be one of"):
        RewardEnsemble(members, combine="max")
    with pytest.raises(ValueError, match="at least two"):
        RewardEnsemble(members[:1])


def test_ensemble_calibration_and_scores_run_without_dropout_whatever_mode_the_members_are_in(tmp_path):
    paths, palm = two_saved_reward_models(tmp_path)
    members = [RewardModel.from_pretrained(p, palm=palm, scope=f"reward_{i}") for i, p in enumerate(paths)]
    for member in members:
        member.dropout.p = 0.5  # a head dropout that would move every calibration if it were on
    ensemble = RewardEnsemble(members).train()  # as a caller may leave it
    calibration = batch(TEXTS * 2 + [("A", " film."), ("It", " was fine, I suppose.")])
    first = ensemble.calibrate(*calibration).shift.clone(), ensemble.scale.clone()
    second = ensemble.calibrate(*calibration).shift.clone(), ensemble.scale.clone()
    in_eval = ensemble.eval().calibrate(*calibration).shift.clone(), ensemble.scale.clone()
    for a, b in ((first, second), (first, in_eval)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    ensemble.train()
    torch.testing.assert_close(ensemble.score(*calibration), ensemble.score(*calibration), rtol=0, atol=0)
    assert all(m.training for m in ensemble.modules())  # the caller's mode comes back


def test_a_loaded_reward_model_scores_in_eval_mode(tmp_path):
    paths, _ = two_saved_reward_models(tmp_path)
    model = RewardModel.from_pretrained(paths[0])
    assert not model.training
    model.dropout.p = 0.5
    seq, prompt_mask, mask = batch(TEXTS)
    torch.testing.assert_close(model.train().score(seq, prompt_mask, mask), model.score(seq, prompt_mask, mask), rtol=0, atol=0)
