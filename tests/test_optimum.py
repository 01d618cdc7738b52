"""Every RL method lands where theory puts it, on a problem small enough to enumerate.

A contextual bandit: two prompts, a response of one token from a vocabulary of 12, a known reward
table r(x, y), and a tiny PaLM as pi_ref. For KL-regularised RL the optimum is known in closed form
(Ziegler et al. 2019; Rafailov et al. 2023, eq. 4):

    pi*(y | x) = pi_ref(y | x) exp(r(x, y) / beta) / Z(x)

and every method is trained, then its whole distribution compared with its target by the exact
KL(pi || target), averaged over the prompts. The targets, from the papers:

- PPO (k1 KL in the per-token reward), RLOO, GRPO, Dr. GRPO and GSPO (GRPO's advantage with one
  length-normalised ratio per response, Zheng et al. 2025) and REINFORCE++ with and without the group
  baseline (Hu et al. 2025) with the KL in the reward: pi*. Without a baseline REINFORCE++'s
  advantage at pi* is not 0 but beta log Z(x) less the batch mean, a constant per prompt whose
  expected gradient is 0; its whitening scales every prompt's gradient alike. At
  pi* the regularised reward r - beta log(pi / pi_ref) = beta log Z is the same for every response,
  so every group-relative advantage is 0 there, whatever the baseline or the scaling by the std.
- Dr. GRPO with DeepSeekMath's k3 KL in the loss: the gradient of E_pi[k3] through pi is that of
  KL(pi_ref || pi), not of KL(pi || pi_ref), and the group mean (sample i included) scales the policy
  gradient by (1 - 1/G). The fixed point maximises (1 - 1/G) E_pi[r] - beta KL(pi_ref || pi):
  pi(y) = beta pi_ref(y) / (lambda - (1 - 1/G) r(y)), lambda normalising it. GRPO's division by the
  group's std on top of it has no closed form: it sharpens past pi*.
- DPO on Bradley-Terry preferences drawn from r: its implicit rewards beta log(pi / pi_ref) of the
  responses (each followed by EOS, as DPOTrainer encodes them) differ as r does: pi* over them.
- IPO (Azar et al. 2023, eq. 17) on the same pairs, drawn uniformly: pi ∝ pi_ref exp(E_y'[p(y > y')] / tau).
- best-of-N: not an optimiser; it samples F(y)^N - F_<(y)^N under pi_ref, F ordered by r.

A sign, a mask or a scale error moves a method off its target; a loss-goes-down test cannot see it.
"""
import math

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.dpo import DPOTrainer
from palm_rlhf.grpo import GRPOTrainer
from palm_rlhf.ppo import RLHFTrainer
from palm_rlhf.tokenizer import PromptEncoding

VOCAB, PAD_ID, EOS_ID = 12, 0, 1
LETTERS = "abcdefghij"  # ids 2..11
BETA = 0.25
PROMPTS = ["ab", "cd"]
# rewards of the 12 possible responses (PAD and EOS included, as a policy may sample them) to each prompt
REWARD = torch.tensor([[0.0, 0.1, 1.0, 0.2, 0.9, 0.0, 0.4, 0.6, 0.3, 0.8, 0.5, 0.7],
                       [0.6, 0.0, 0.1, 0.9, 0.2, 1.0, 0.3, 0.5, 0.8, 0.4, 0.7, 0.0]])


class Letters(PromptEncoding):
    """A tokenizer of the bandit's vocabulary: PAD 0, EOS 1, a..j 2..11."""

    pad_id, eos_id, vocab_size = PAD_ID, EOS_ID, VOCAB
    num_tokens = VOCAB

    def encode(self, text: str, add_eos: bool = False) -> torch.Tensor:
        return torch.tensor([2 + LETTERS.index(c) for c in text] + [EOS_ID] * add_eos, dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(LETTERS[i - 2] for i in torch.as_tensor(ids).tolist() if i >= 2)


def reference_palm() -> PaLM:
    torch.manual_seed(0)
    palm = PaLM.from_config(PaLMConfig.from_name("tiny", num_tokens=VOCAB, pad_id=PAD_ID, tie_embedding=False))
    torch.nn.init.normal_(palm.to_logits.weight, std=0.15)  # pi_ref far from uniform, within the adapters' reach
    palm.tokenizer = Letters()
    return palm


def prompt_ids() -> list:
    return [torch.cat((torch.tensor([EOS_ID]), Letters().encode(p))) for p in PROMPTS]


def bandit_reward(seq, prompt_mask, mask):
    """r(x, y): x told by the prompt's first letter, y the response's one token."""
    x = (seq[:, 1] != 2 + LETTERS.index("a")).long()
    last = mask.long().cumsum(dim=1).argmax(dim=1)
    return REWARD[x, seq[torch.arange(len(seq)), last]]


@torch.no_grad()
def first_token_distributions(palm, **scope) -> torch.Tensor:
    """(2, VOCAB): the distribution of the one response token after each prompt, in float64."""
    return torch.stack([palm(p[None], **scope)[0, -1].double().softmax(-1) for p in prompt_ids()])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Exact KL(p || q) per prompt, averaged: p, q (2, VOCAB)."""
    return float((p * (p / q).log()).sum(dim=1).mean())


def regularised_optimum(reference: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    return (reference.log() + REWARD.double() / beta).softmax(dim=1)


def reverse_kl_optimum(reference: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """argmax_pi scale * E_pi[r] - beta KL(pi_ref || pi): pi = beta pi_ref / (lambda - scale r), lambda
    found by bisection so that pi sums to 1 (lambda > scale * max r)."""
    rewards = scale * REWARD.double()
    rows = []
    for ref, r in zip(reference, rewards):
        low, high = float(r.max()) + 1e-12, float(r.max()) + beta + 100.0
        for _ in range(200):
            lam = (low + high) / 2
            low, high = (lam, high) if float((beta * ref / (lam - r)).sum()) > 1 else (low, lam)
        rows.append(beta * ref / ((low + high) / 2 - r))
    return torch.stack(rows)


def train_rl(trainer, iterations: int, batch: int) -> torch.Tensor:
    for _ in range(iterations):
        trainer.step(max_seq_len=4, **batch)  # the prompts hold 3 tokens: one response token
    return first_token_distributions(trainer.palm, finetune_scope="actor")


RL_METHODS = {
    "ppo": lambda: RLHFTrainer(palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(),
                               beta=BETA, kl_target=None, actor_lr=3e-3, critic_lr=3e-3, epochs=1, minibatch_size=128, rollout_batch_size=128, seed=0),
    **{f"{estimator}, KL in the reward": (lambda estimator=estimator: GRPOTrainer(
        palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(), estimator=estimator,
        group_size=16, beta=BETA, kl_target=None, kl_in="reward", loss_aggregation="token", lr=3e-3, minibatch_size=128, seed=0))
       for estimator in ("rloo", "grpo", "dr_grpo")},
    "gspo, KL in the reward": lambda: GRPOTrainer(
        palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(), estimator="grpo", importance_ratio="sequence",
        eps_clip=3e-4, eps_clip_high=4e-4, group_size=16, beta=BETA, kl_target=None, kl_in="reward", loss_aggregation="sequence",
        lr=3e-3, minibatch_size=128, seed=0),
    **{f"{estimator}, KL in the reward": (lambda estimator=estimator: GRPOTrainer(
        palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(), estimator=estimator,
        group_size=16, beta=BETA, kl_target=None, kl_in="reward", loss_aggregation="token", lr=3e-3, minibatch_size=128, seed=0))
       for estimator in ("reinforce_pp", "reinforce_pp_baseline")},
    # groups of 2, so that many have equal scores and DAPO's dynamic sampling replaces them
    "rloo with dynamic sampling, KL in the reward": lambda: GRPOTrainer(
        palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(), estimator="rloo", group_size=2,
        prompts_per_step=64, dynamic_sampling=True, beta=BETA, kl_target=None, kl_in="reward", loss_aggregation="token", lr=3e-3, minibatch_size=128, seed=0),
}


@pytest.fixture(scope="module")
def reference():
    return first_token_distributions(reference_palm())


@pytest.mark.parametrize("method", list(RL_METHODS))
def test_kl_regularised_rl_reaches_the_closed_form_optimum(method, reference):
    trainer = RL_METHODS[method]()
    batch = dict(rollout_batch_size=128) if method == "ppo" else dict(prompts_per_step=128 // trainer.config.group_size)
    target = regularised_optimum(reference)
    assert kl(reference, target) > 0.3  # the optimum is far from where training starts
    tuned = train_rl(trainer, 150, batch)
    assert kl(tuned, target) < 0.02, (method, kl(tuned, target), kl(reference, target))


def grpo_with_kl_in_the_loss(estimator: str) -> GRPOTrainer:
    return GRPOTrainer(palm=reference_palm(), reward_fn=bandit_reward, prompt_token_ids=prompt_ids(), estimator=estimator,
                       group_size=16, beta=BETA, kl_target=None, kl_in="loss", loss_aggregation="token", lr=3e-3, minibatch_size=128, seed=0)


def test_the_k3_kl_in_the_loss_reaches_the_reverse_kl_optimum_not_pi_star(reference):
    target, star = reverse_kl_optimum(reference, BETA, 1 - 1 / 16), regularised_optimum(reference)
    assert kl(target, star) > 0.05  # the two objectives are told apart here
    tuned = train_rl(grpo_with_kl_in_the_loss("dr_grpo"), 200, dict(prompts_per_step=8))
    assert kl(tuned, target) < 0.01 < kl(tuned, star) - 0.05, (kl(tuned, target), kl(tuned, star))


def test_grpo_with_the_k3_kl_in_the_loss_sharpens_past_pi_star(reference):
    """GRPO's (r - mean) / std divides the policy gradient by a std that shrinks as the policy
    concentrates, a KL price that vanishes: no closed form, but a fixed point sharper than pi*."""
    star = regularised_optimum(reference)
    tuned = train_rl(grpo_with_kl_in_the_loss("grpo"), 200, dict(prompts_per_step=8))
    assert kl(tuned, star) > 1 > kl(star, reference)
    assert (tuned.max(dim=1).values > star.max(dim=1).values + 0.2).all()


# --- DPO and IPO: preferences with the Bradley-Terry frequencies of r over every pair of letters


def preference_pairs(draws: int = 100) -> list:
    """Every unordered pair of the 10 letter responses to each prompt, `draws` times, y chosen over y'
    in round(draws * sigmoid(r(y) - r(y'))) of them: the Bradley-Terry frequencies without their
    sampling noise."""
    pairs = []
    for x, prompt in enumerate(PROMPTS):
        for i in range(2, VOCAB):
            for j in range(i + 1, VOCAB):
                wins = round(draws * float(torch.sigmoid(REWARD[x, i] - REWARD[x, j])))
                a, b = LETTERS[i - 2], LETTERS[j - 2]
                pairs += [dict(prompt=prompt, chosen=a, rejected=b)] * wins
                pairs += [dict(prompt=prompt, chosen=b, rejected=a)] * (draws - wins)
    return pairs


@torch.no_grad()
def letter_response_distributions(palm, **scope) -> torch.Tensor:
    """(2, 10): each prompt's distribution over the responses "y" + EOS, y a letter, renormalised over
    the 10 (the responses the preferences are about)."""
    tokenizer, rows = Letters(), []
    for prompt in PROMPTS:
        seq = torch.stack([torch.cat((torch.tensor([EOS_ID]), tokenizer.encode(prompt + letter, add_eos=True)))
                           for letter in LETTERS])
        log_probs = palm.log_probs(seq, **scope)[:, -2:].double().sum(dim=1)  # the letter and its EOS
        rows.append(log_probs.softmax(dim=0))
    return torch.stack(rows)


def train_dpo(method: str, beta: float) -> tuple:
    palm = reference_palm()
    trainer = DPOTrainer(palm=palm, pairs=preference_pairs(), method=method, beta=beta, lr=1e-2, batch_size=256,
                         warmup_steps=10, steps=400, max_len=8, seed=0)  # decays, so that it settles
    trainer.train(num_steps=400)
    return letter_response_distributions(palm, finetune_scope="dpo"), letter_response_distributions(palm, disable_lora=True)


@pytest.mark.slow
def test_dpo_reaches_pi_star_over_the_compared_responses():
    tuned, reference = train_dpo("dpo", BETA)
    letters = REWARD[:, 2:].double()
    target = (reference.log() + letters / BETA).softmax(dim=1)
    assert kl(reference, target) > 0.3
    assert kl(tuned, target) < 0.02, (kl(tuned, target), kl(reference, target))


@pytest.mark.slow
def test_ipo_reaches_its_own_optimum_over_the_compared_responses():
    tau = 0.25
    tuned, reference = train_dpo("ipo", tau)
    letters = REWARD[:, 2:].double()
    win_rate = torch.sigmoid(letters[:, :, None] - letters[:, None, :]).mean(dim=2)  # E_y'[p(y > y')], y' uniform
    target = (reference.log() + win_rate / tau).softmax(dim=1)
    dpo_target = (reference.log() + letters / tau).softmax(dim=1)
    assert kl(target, dpo_target) > 0.05  # IPO's optimum is not DPO's
    assert kl(tuned, target) < 0.02, (kl(tuned, target), kl(tuned, dpo_target))


# --- best-of-N: the order statistic of pi_ref


def test_best_of_n_samples_the_order_statistic_of_the_reference(reference):
    trainer = RL_METHODS["ppo"]()
    n, draws, prompt = 4, 1500, prompt_ids()[0]
    torch.manual_seed(0)
    picks = torch.tensor([int(trainer.generate(4, prompt=prompt, num_samples=n)[-1]) for _ in range(draws)])
    counted = torch.bincount(picks, minlength=VOCAB).double() / draws
    ref, rewards = reference[0], REWARD[0]
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    for level in rewards.unique():  # tied responses share their level's pick, as pi_ref weighs them
        tied = rewards == level
        at_or_below, below = ref[rewards <= level].sum(), ref[rewards < level].sum()
        expected[tied] = (at_or_below**n - below**n) * ref[tied] / ref[tied].sum()
    se = (expected * (1 - expected) / draws).sqrt()
    assert ((counted - expected).abs() <= 4 * se + 1e-3).all(), (counted, expected)
    assert kl(expected[None], ref[None]) > 0.3  # far from pi_ref itself
