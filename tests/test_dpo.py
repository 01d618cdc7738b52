import math
import random

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.dpo import (
    METHODS,
    DPOTrainer,
    dpo_loss,
    encode_responses,
    ipo_loss,
    kto_examples,
    kto_kl_estimate,
    kto_loss,
    reference_kl,
    preference_accuracy,
    sequence_log_probs,
)
from palm_rlhf.tokenizer import EOS_ID, PAD_ID


def tiny():
    torch.manual_seed(0)
    return PaLM.from_config(PaLMConfig.from_name("tiny", flash_attn=False))


def fixed_log_probs():
    # summed response log-probs of 3 pairs: policy chosen, policy rejected, reference chosen, rejected
    return (torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.5]),
            torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.5, -19.5, -4.0]))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- losses against transcriptions of the papers' formulas, element by element -------------------


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.0])
    loss, chosen, rejected = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_and_conservative_dpo_match_the_formula(label_smoothing):
    pc, pr, rc, rr = fixed_log_probs()
    beta, eps = 0.5, label_smoothing
    expected = []
    for i in range(3):
        h = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        # Rafailov eq. 7; Mitchell 2023: the label is flipped with probability eps
        expected.append(-(1 - eps) * math.log(sigmoid(h)) - eps * math.log(sigmoid(-h)))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


def test_ipo_matches_the_formula_and_is_zero_at_the_target_margin():
    pc, pr, rc, rr = fixed_log_probs()
    tau = 0.25
    expected = [(math.log(math.exp(pc[i]) * math.exp(rr[i]) / (math.exp(pr[i]) * math.exp(rc[i]))) - 1 / (2 * tau)) ** 2
                for i in range(3)]
    loss, chosen, rejected = ipo_loss(pc, pr, rc, rr, tau=tau)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    # a log-ratio margin of exactly 1 / (2 tau) is IPO's optimum: zero loss, unlike DPO
    ref = torch.zeros(1)
    assert ipo_loss(torch.tensor([1 / (2 * tau)]), ref, ref, ref, tau=tau)[0].item() == pytest.approx(0.0)


def test_kto_matches_the_formula():
    policy, ref = torch.tensor([-10.0, -20.0, -5.0, -8.0]), torch.tensor([-11.0, -19.0, -6.0, -7.0])
    desirable = torch.tensor([True, False, True, False])
    beta, z0, lambda_d, lambda_u = 0.5, 0.3, 1.0, 1.5
    expected = []
    for i in range(4):
        r = (policy[i] - ref[i]).item()
        # Ethayarajh et al. 2024, eq. 8: L = lambda_y - v(x, y)
        if desirable[i]:
            expected.append(lambda_d - lambda_d * sigmoid(beta * (r - z0)))
        else:
            expected.append(lambda_u - lambda_u * sigmoid(beta * (z0 - r)))
    loss, rewards = kto_loss(policy, ref, desirable, beta, torch.tensor(z0), lambda_d, lambda_u)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    torch.testing.assert_close(rewards, beta * (policy - ref))


def test_kto_reference_point_is_a_clamped_detached_mean_log_ratio():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert kto_kl_estimate(policy, torch.tensor([-2.0, -2.0])).item() == pytest.approx(0.5)
    assert kto_kl_estimate(policy, torch.tensor([0.0, 0.0])).item() == 0.0  # clamped at 0
    assert not kto_kl_estimate(policy, torch.zeros(2) - 5).requires_grad


def test_preference_accuracy_counts_ties_half():
    assert preference_accuracy(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 2.0, 0.0])).item() == 0.5
    assert preference_accuracy(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0


# --- sequences and log-probs -------------------------------------------------------------------------


def test_encode_responses_layout_and_truncation():
    seq, mask, response_mask = encode_responses(["Hi", ""], ["ok", "abc"])
    assert seq[0].tolist() == [EOS_ID, ord("H"), ord("i"), ord("o"), ord("k"), EOS_ID]
    assert seq[1].tolist() == [EOS_ID, ord("a"), ord("b"), ord("c"), EOS_ID, PAD_ID]
    assert response_mask[0].tolist() == [False, False, False, True, True, True]
    assert response_mask[1].tolist() == [False, True, True, True, True, False]
    assert mask.tolist() == (seq != PAD_ID).tolist()
    cut, _, cut_response = encode_responses(["Hi"], ["okay"], max_len=5)
    assert cut[0].tolist() == [EOS_ID, ord("H"), ord("i"), ord("o"), ord("k")]  # no EOS: it did not end
    assert cut_response.sum() == 2
    with pytest.raises(ValueError, match="no room"):
        encode_responses(["long prompt"], ["x"], max_len=5)


def test_sequence_log_probs_sums_response_tokens_and_ignores_padding():
    palm = tiny()
    seq, mask, response_mask = encode_responses(["The", "A much longer prompt"], ["good", "bad"])
    summed = sequence_log_probs(palm, seq, mask, response_mask)
    for i in range(2):
        n = int(mask[i].sum())
        per_token = palm.log_probs(seq[i : i + 1, :n])[0]  # unpadded, one at a time
        expected = per_token[response_mask[i, 1:n]].sum()
        torch.testing.assert_close(summed[i], expected, atol=1e-4, rtol=1e-5)


# --- the trainer on a tiny synthetic preference task ----------------------------------------------


def synthetic_pairs(n, seed):
    """Chosen responses are spelled with a, b, c; rejected ones with x, y, z."""
    rng = random.Random(seed)
    word = lambda letters: "".join(rng.choice(letters) for _ in range(8))  # noqa: E731
    return [dict(prompt=rng.choice(["", "Q:"]), chosen=word("abc"), rejected=word("xyz")) for _ in range(n)]


def kto_from_pairs(pairs):
    half = len(pairs) // 2
    return ([dict(prompt=p["prompt"], response=p["chosen"], desirable=True) for p in pairs[:half]]
            + [dict(prompt=p["prompt"], response=p["rejected"], desirable=False) for p in pairs[half:]])


def make_trainer(method, palm=None, **overrides):
    train = synthetic_pairs(48, seed=0)
    # the trainer's defaults before they became train_dpo.py's: 320 tokens, a schedule that never decays
    options = dict(palm=palm or tiny(), method=method, lr=1e-2, batch_size=8, warmup_steps=1, seed=0, max_len=320, steps=10**9)
    if method == "kto":
        options["examples"] = kto_from_pairs(train)
    else:
        options["pairs"] = train
    return DPOTrainer(**{**options, **overrides})


@pytest.mark.parametrize("method", METHODS)
def test_implicit_reward_accuracy_rises_well_above_chance(method):
    trainer = make_trainer(method)
    held_out = synthetic_pairs(32, seed=1)
    assert trainer.evaluate(held_out)["pref_accuracy"] == 0.5  # policy == reference: all ties
    trainer.train(num_steps=6)
    after = trainer.evaluate(held_out)
    assert after["pref_accuracy"] >= 0.9
    assert after["reward_margin"] > 0


def test_evaluate_matches_a_direct_computation_also_when_memoised():
    trainer = make_trainer("dpo")
    held_out = synthetic_pairs(12, seed=1)
    trainer.evaluate(held_out)  # memoises the reference log-probs
    trainer.train(num_steps=2)
    got = trainer.evaluate(held_out, batch_size=5)
    prompts = [p["prompt"] for p in held_out]
    chosen, rejected = (encode_responses(prompts, [p[k] for p in held_out]) for k in ("chosen", "rejected"))
    with torch.no_grad():
        reward = [0.1 * (sequence_log_probs(trainer.palm, *batch, finetune_scope="dpo")
                         - sequence_log_probs(trainer.palm, *batch, disable_lora=True)) for batch in (chosen, rejected)]
    assert got["pref_accuracy"] == pytest.approx(preference_accuracy(*reward).item())
    assert got["reward_margin"] == pytest.approx((reward[0] - reward[1]).mean().item(), abs=1e-5)


def test_only_adapter_weights_move_and_reference_is_unchanged():
    palm = tiny()
    base = {k: v.clone() for k, v in palm.state_dict().items()}
    probe = encode_responses(["", "Q:"], ["abcabc", "xyz"])
    ref_before = sequence_log_probs(palm, *probe)
    trainer = make_trainer("dpo", palm=palm)
    adapters = {k: v.clone() for k, v in palm.state_dict().items() if k.startswith("finetune_modules.")}
    trainer.train(num_steps=3)
    after = palm.state_dict()
    for name, value in base.items():
        assert torch.equal(after[name], value), f"frozen weight {name} changed"
    assert any(not torch.equal(after[name], value) for name, value in adapters.items())
    torch.testing.assert_close(sequence_log_probs(palm, *probe, disable_lora=True), ref_before)
    assert not torch.allclose(sequence_log_probs(palm, *probe, finetune_scope="dpo"), ref_before)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_loss(method):
    cached = make_trainer(method, precompute_ref=True)
    fresh = make_trainer(method)
    torch.testing.assert_close(torch.tensor(cached.train_step()["loss"]), torch.tensor(fresh.train_step()["loss"]))


def test_merged_policy_equals_adapter_policy():
    palm = tiny()
    trainer = make_trainer("dpo", palm=palm)
    trainer.train(num_steps=2)
    probe = encode_responses(["Q:"], ["abc"])
    with torch.no_grad():
        policy = sequence_log_probs(palm, *probe, finetune_scope="dpo")
        palm.merge_finetune_params("dpo")
        torch.testing.assert_close(sequence_log_probs(palm, *probe), policy, atol=1e-4, rtol=1e-5)


def test_reference_kl_is_zero_at_init_then_matches_a_direct_sum():
    palm = tiny()
    trainer = make_trainer("dpo", palm=palm)
    seq, mask, response_mask = encode_responses(["", "Q:"], ["abcab", "xyzzy"])
    assert reference_kl(palm, seq, mask, response_mask, "dpo") == pytest.approx((0.0, 0.0), abs=1e-6)
    trainer.train(num_steps=3)
    per_token, per_response = reference_kl(palm, seq, mask, response_mask, "dpo")
    with torch.no_grad():
        p = palm(seq[:, :-1], mask=mask[:, :-1], finetune_scope="dpo").softmax(-1)
        q = palm(seq[:, :-1], mask=mask[:, :-1], disable_lora=True).softmax(-1)
    kls = [[float((p[b, t] * (p[b, t] / q[b, t]).log()).sum()) for t in range(seq.shape[1] - 1) if response_mask[b, t + 1]]
           for b in range(2)]
    assert per_token > 1e-4
    assert per_token == pytest.approx(sum(map(sum, kls)) / sum(map(len, kls)), rel=1e-4)
    assert per_response == pytest.approx(sum(map(sum, kls)) / 2, rel=1e-4)


def test_kto_examples_thresholds_and_bad_input():
    records = [dict(prompt="", response=str(r), rating=r) for r in (1, 2, 3, 4, 5)]
    examples = kto_examples(records, desirable_min=4, undesirable_max=2)
    assert [(e["response"], e["desirable"]) for e in examples] == [("1", False), ("2", False), ("4", True), ("5", True)]
    with pytest.raises(ValueError, match="must exceed"):
        kto_examples(records, desirable_min=2, undesirable_max=3)
    with pytest.raises(ValueError, match="unknown method"):
        DPOTrainer(palm=tiny(), pairs=synthetic_pairs(4, 0), method="ppo")
    with pytest.raises(ValueError, match="lacks"):
        DPOTrainer(palm=tiny(), examples=[dict(prompt="", response="x")], method="kto")


@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_with_dropout_the_loss_at_init_is_that_of_policy_equals_reference(method):
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", attn_dropout=0.3, ff_dropout=0.3))
    trainer = make_trainer(method, palm=palm)
    expected = math.log(2) if method == "dpo" else (1 / (2 * 0.1)) ** 2
    assert trainer.train_step()["loss"] == pytest.approx(expected, abs=1e-6)
