"""Critic-free RL for RLHF: GRPO, Dr. GRPO, RLOO, GSPO and REINFORCE++ on one frozen PaLM.

Instead of a learned critic, each prompt gets G sampled responses and each response's baseline comes
from the scores of its group. One iteration (`GRPOTrainer.step`), each step numbered in the code:

    1. rollout: P prompts, G responses to each sampled at temperature T with the KV-cached sampler
       (each prompt encoded once, its cache shared by its G samples), cut after their first EOS;
       with dynamic_sampling, DAPO's (Yu et al. 2025): groups whose scores are all equal give way
       to groups of newly drawn prompts
    2. log-probs of the responses under the sampling policy (pi_old of the ratio) and, when
       beta > 0, under the frozen reference
    3. scores from the reward model or reward function, less DAPO's overlong penalty when
       overlong_buffer is set; with kl_in="reward", beta times the summed
       k1 KL of each response is subtracted from its score, as PPO's reward does; beta adapts to
       kl_target as PPO's (Ziegler et al. 2019, eq. 2), unless kl_target=None
    4. one advantage per response, given to each of its tokens: GRPO's (r - mean) / std
       (Shao et al. 2024), Dr. GRPO's r - mean (Liu et al. 2025) or RLOO's r - mean of the others
       (Ahmadian et al. 2024), over the G scores of its prompt; or REINFORCE++'s (Hu et al. 2025), one
       per token: the score (less the group mean, for its baseline variant) less the KL penalty still
       to come, whitened over the batch
    5. epochs x minibatches of PPO's clipped surrogate (with DAPO's clip-higher as an option), plus,
       with kl_in="loss", beta times the k3 KL to the reference per token (DeepSeekMath eq. 3-4),
       aggregated over tokens by `loss_aggregation`; gradient clipping, one AdamW step per minibatch
    6. diagnostics: score, KL to the reference, share of groups whose scores are all equal,
       approx KL old -> new, clip fraction, response length, entropy

Where this departs from the papers:

    1. The policy is a LoRA scope on one frozen base, and the reference is that base with the
       adapters disabled (Hydra-RLHF, Santacroce et al. 2023), not a second copy. The reference
       stays fixed (DeepSeekMath's iterative GRPO, section 4.1.4, resets it to the policy).
    2. One score per response (outcome supervision, DeepSeekMath section 4.1.2); no process reward.
    3. The three methods are options of one loss. As the papers run them: GRPO estimator="grpo",
       loss_aggregation="sequence", kl_in="loss"; Dr. GRPO estimator="dr_grpo",
       loss_aggregation="constant", beta=0 (the paper drops the KL term); RLOO estimator="rloo",
       kl_in="reward", loss_aggregation="constant" and one minibatch of the whole batch, one step:
       Ahmadian et al. take one REINFORCE step per batch, and with the ratio at exactly 1 the clipped
       surrogate's gradient is that step's, up to a constant factor. train_grpo.py's default, named
       "RLOO" in its tables, is not that: RLOO's advantage with the KL in the reward, token
       aggregation and minibatches of 16, so 4 clipped optimizer steps per batch of 64 (PPO-style
       reuse); its --estimator dr_grpo keeps the script's beta 0.2 in the reward unless --beta 0.
    4. The default aggregation is "token" (DAPO, Yu et al. 2025, section 3.3), not GRPO's mean of
       per-response means, which weighs a token of a short response more than one of a long one.
    5. Rollouts sample at temperature T only (no top-k / top-p), so the samples come from exactly
       the policy whose log-probs enter the ratio, as in ppo.py.
    6. Groups whose scores are all equal get zero advantage and are kept (only their KL term, if
       any, acts), unless dynamic_sampling drops them as DAPO does; their share is reported. DAPO
       samples until the batch is full; here at most max_sampling_rounds rounds are drawn and a
       batch still short keeps some equal-score groups, so that an iteration's cost is bounded. The
       groups are judged by their scores, as DAPO's by accuracy (it has no KL term): with the KL in
       the reward a dropped group could still carry the KL's gradient.
    7. Optionally, a response that never emits EOS has `missing_eos_penalty` subtracted from its
       score before the group baseline (as ppo.py).
    8. beta is PPO's adaptive one by default, moved each iteration towards kl_target (8 nats, as
       PPO's) over a longer horizon (1,000 responses): with PPO's, RLOO's KL and beta oscillate
       (docs/results.md); and the learning rate decays linearly (lr_schedule), so that the final
       policy's KL does not depend on where the last noisy updates left it. The papers keep beta
       and the learning rate fixed, as kl_target=None and lr_schedule="constant" do.
    9. Optionally (importance_ratio="sequence"), GSPO's ratio (Zheng et al. 2025): one length-normalised
       ratio per response, clipped per response, in place of the per-token ratio.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
from accelerate import Accelerator
from beartype import beartype
from torch import nn

from palm_rlhf.config import require, setting, with_settings
from palm_rlhf.model import PaLM
from palm_rlhf.rl import (
    Actor, KLController, Normalizers, PolicyTrainer, RLConfig, RolloutTensors, Samples, clipped_surrogate, kl_penalty,
    masked_log_ratio, masked_mean, masked_whiten, token_mean,
)

# ---------------------------------------------------------------------------------------------------
# group-relative advantages: scores (P, G), P prompts x G samples of each -> advantages (P, G)


def constant_groups(scores: torch.Tensor) -> torch.Tensor:
    """(P, G) scores -> (P,) bool, True where all G scores of a prompt are equal: such a group has
    no signal, and the float mean of equal numbers may miss them by an ulp, so its advantages are
    set to exactly 0."""
    return (scores == scores[:, :1]).all(dim=1)


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervision advantage (Shao et al. 2024, "DeepSeekMath", section 4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)    over the G scores r of one prompt

    std is the sample standard deviation (Bessel-corrected, as TRL); every token of response i gets
    A_i. A group of equal scores, or of one sample (G = 1), gets 0."""
    if scores.shape[1] == 1:
        return torch.zeros_like(scores)
    centred = scores - scores.mean(dim=1, keepdim=True)
    advantages = centred / (scores.std(dim=1, keepdim=True) + eps)
    return advantages.masked_fill(constant_groups(scores)[:, None], 0.0)


def dr_grpo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", section 3): GRPO's without the division by the group std, which up-weights
    prompts whose scores barely vary (too easy or too hard):

        A_i = r_i - mean(r)

    A group of equal scores, or of one sample, gets 0."""
    advantages = scores - scores.mean(dim=1, keepdim=True)
    return advantages.masked_fill(constant_groups(scores)[:, None], 0.0)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for
    Free!"; for RLHF, Ahmadian et al. 2024, "Back to Basics", section 3): each sample's baseline is
    the mean score of the other G - 1 samples of its prompt, so the baseline is independent of it:

        A_i = r_i - 1 / (G - 1) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean(r))

    Needs G >= 2. A group of equal scores gets 0."""
    g = scores.shape[1]
    if g < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt for its leave-one-out baseline, got group_size {g}")
    leave_one_out = (scores.sum(dim=1, keepdim=True) - scores) / (g - 1)
    return (scores - leave_one_out).masked_fill(constant_groups(scores)[:, None], 0.0)


ADVANTAGE_ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


def reinforce_pp_advantages(scores: torch.Tensor, token_penalty: torch.Tensor | None, mask: torch.Tensor,
                            baseline: bool) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, eq. 8-10): a per-token advantage, the score less the KL penalty
    still to come, whitened over every response token of the batch:

        A_it = whiten_batch( r_i - sum_{s >= t} beta * KL_is )

    r_i is the score, or with `baseline` ("REINFORCE++-baseline") the score less its group's mean
    (a group of equal scores gets exactly 0). scores (P, G); token_penalty (P * G, r), beta * KL of
    each response token, or None (no KL in the reward); mask (P * G, r) -> advantages (P * G, r)."""
    centred = dr_grpo_advantages(scores) if baseline else scores
    returns = centred.reshape(-1, 1).expand(mask.shape)
    if token_penalty is not None:
        returns = returns - (token_penalty * mask).flip(1).cumsum(1).flip(1)
    return masked_whiten(returns, mask)


TOKEN_ESTIMATORS = {"reinforce_pp": False, "reinforce_pp_baseline": True}  # name -> with the group baseline


# ---------------------------------------------------------------------------------------------------
# DAPO's shaping of the batch and of the reward (Yu et al. 2025)


def overlong_penalty(lengths: torch.Tensor, budget: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13) as a penalty to subtract from the score: 0 up to
    budget - buffer tokens, then rising linearly to 1 at the budget, where responses are cut:

        penalty = clamp((|y| - (budget - buffer)) / buffer, 0, 1)

    lengths (b,) response tokens -> (b,)."""
    return ((lengths.float() - (budget - buffer)) / buffer).clamp(0, 1)


def chosen_groups(informative: torch.Tensor, wanted: int) -> torch.Tensor:
    """DAPO's dynamic sampling keeps groups whose scores differ (eq. 11): (K,) bool over the groups
    drawn, in the order drawn -> the indices of the `wanted` groups of the batch, in that order: the
    first informative ones, then, if there are too few, the first of the others."""
    index = torch.arange(len(informative))
    ranked = torch.cat((index[informative], index[~informative]))
    return ranked[:wanted].sort().values


def merge_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Samples drawn in several rounds, before their forward passes, as one batch: each prompt
    left-padded to the longest prompt, each response right-padded to the longest response."""
    start = max(p.start for p in parts)
    width = max(p.seq.shape[1] - p.start for p in parts)

    def aligned(t, p, fill):  # (b, p.start + its width) -> (b, start + width)
        left, right = start - p.start, width - (t.shape[1] - p.start)
        return torch.cat((t.new_full((len(t), left), fill), t, t.new_full((len(t), right), fill)), dim=1)

    def responses(name):  # (b, its width) per response token -> (b, width), 0 after each part's width
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([torch.cat((t, t.new_zeros(len(t), width - t.shape[1])), dim=1) for t in (getattr(p, name) for p in parts)])

    return Samples(torch.cat([aligned(p.seq, p, pad_id) for p in parts]), torch.cat([aligned(p.mask, p, False) for p in parts]),
                   start, parts[0].budget, scores=torch.cat([p.scores for p in parts]),
                   penalty=torch.cat([p.penalty for p in parts]), ended=torch.cat([p.ended for p in parts]),
                   token_rewards=responses("token_rewards"), sampler_log_probs=responses("sampler_log_probs"))


def select_rows(samples: Samples, rows: torch.Tensor) -> Samples:
    """The samples' rows `rows`, every per-response tensor indexed alike."""
    return replace(samples, **{f.name: getattr(samples, f.name)[rows] for f in fields(samples)
                               if isinstance(getattr(samples, f.name), torch.Tensor)})


# ---------------------------------------------------------------------------------------------------
# the loss over tokens


def sequence_log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's importance ratio (Zheng et al. 2025, eq. 7) as a log, given to every token of its
    response: (b, r) log-probs -> (b, r), row i holding

        log s_i = 1/|y_i| sum_t (log pi(y_it) - log pi_old(y_it)),   s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)

    The clipped surrogate on s_i, aggregated by "sequence", is GSPO's objective: one ratio and one
    clipping decision per response, its gradient s_i A_i times the mean of the tokens' score functions."""
    per_response = masked_mean(masked_log_ratio(log_probs, old_log_probs, mask), mask, dim=1)  # (b,)
    return per_response[:, None].expand_as(log_probs)


def aggregate_loss(losses: torch.Tensor, mask: torch.Tensor, how: str, max_len: int | None = None,
                   normalizers: Normalizers | None = None) -> torch.Tensor:
    """Per-token losses (b, r) -> one loss over the response tokens (mask True), `how`:

        "token":    sum_i sum_t l_it / sum_i |o_i|      every token weighs the same
                    (DAPO, Yu et al. 2025, section 3.3, "token-level policy gradient loss")
        "sequence": 1/b sum_i 1/|o_i| sum_t l_it        GRPO (Shao et al. 2024, eq. 3)
        "constant": sum_i sum_t l_it / (b * max_len)    Dr. GRPO (Liu et al. 2025): no division
                    by a response's own length, which favours short responses with a positive
                    advantage and long ones with a negative advantage; max_len is the fixed
                    response budget

    sum_i |o_i| and b are those of `normalizers` when given: the whole minibatch's, over its
    micro-batches and processes, so that the parts add up to the minibatch's loss (DAPO's token mean
    is over the batch, not over each process's or micro-batch's share of it).
    """
    tokens, responses = (mask.sum().clamp(min=1), mask.shape[0]) if normalizers is None else normalizers
    if how == "token":
        return (losses * mask).sum() / tokens
    if how == "sequence":
        return masked_mean(losses, mask, dim=1).sum() / responses
    if how == "constant":
        return (losses * mask).sum() / (responses * max_len)
    raise ValueError(f"unknown loss_aggregation {how!r}; choose token, sequence or constant")


# ---------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class GroupRollout(RolloutTensors):
    """One batch of groups: seq, mask (P * G, n), prompt i's G responses in rows i * G .. i * G + G - 1;
    advantages (P * G,), or (P * G, r) per token (REINFORCE++); log-probs (P * G, r) of the response seq[:, start:] under the sampling policy
    and under the reference (None when beta = 0); max_new_tokens = the response budget, the
    constant of Dr. GRPO's aggregation; is_weights (P * G, r), the rollout_correction's, or None."""

    seq: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor | None
    start: int
    temperature: float
    max_new_tokens: int
    is_weights: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# the settings, whose defaults train_grpo.py runs with


@dataclass
class GRPOConfig(RLConfig):
    """The group methods' settings; the defaults (RLOO, the KL in the reward, beta adaptive towards 8
    nats over a horizon of 1,000 responses, a linearly decaying learning rate) are train_grpo.py's:
    they clear the README's bar on 5 seeds of 5 (docs/results.md)."""

    iterations: int = setting(120, "iterations (a rollout of prompts_per_step x group_size, then its updates)", at_least=1)
    estimator: str = setting("rloo", "advantage: rloo (r - mean of the others), grpo ((r - mean) / std), dr_grpo (r - mean), or REINFORCE++'s per-token one whitened over the batch, without (reinforce_pp) or with the group mean as baseline (reinforce_pp_baseline)",
                             choices=(*ADVANTAGE_ESTIMATORS, *TOKEN_ESTIMATORS))
    group_size: int = setting(8, "responses sampled per prompt (G)", at_least=1)
    prompts_per_step: int = setting(8, "prompts per iteration and process", at_least=1)
    lr: float = setting(1e-3, "learning rate of the policy's LoRA", above=0)
    lora_r: int = setting(8, "LoRA rank of the policy", at_least=1)
    lora_scope: str = setting("actor", "name of the policy's fine-tune scope on the PaLM")
    weight_decay: float = setting(0.0, "AdamW weight decay", at_least=0)
    beta: float = setting(0.2, "KL coefficient (the initial value when adaptive); 0 skips the reference model entirely", at_least=0)
    lr_schedule: str = setting("linear", "learning rate over the iterations: constant, or linear (from lr down to lr / iterations at the last, as lm-human-preferences anneals it); linear holds RLOO's final KL within 6.9-8.8 nats over 5 seeds, where a constant rate left it anywhere in 5.3-9.2", choices=("constant", "linear"))
    kl_horizon: int = setting(1000, "horizon of the adaptive beta, in responses: the larger, the slower it moves; RLOO's KL answers beta faster than PPO's, and a shorter horizon makes the two oscillate", at_least=1)
    kl_in: str = setting("reward", "loss (k3 per token, as GRPO) or reward (k1 per response subtracted from the score, as PPO)",
                         choices=("loss", "reward"))
    loss_aggregation: str = setting("token", "token (mean over the batch's tokens, DAPO), sequence (mean of per-response means, GRPO) or constant (sum / responses x budget, Dr. GRPO)",
                                    choices=("token", "sequence", "constant"))
    eps_clip: float = setting(0.2, "clip range of the policy ratio (lower side, and upper unless eps_clip_high)", above=0)
    eps_clip_high: float | None = setting(None, "upper clip range (DAPO's clip-higher, e.g. 0.28); none = eps_clip", above=0)
    importance_ratio: str = setting("token", "token (PPO's pi / pi_old per token) or sequence (GSPO's length-normalised ratio per response, Zheng et al. 2025: with loss_aggregation sequence and a clip range near 3e-4 / 4e-4)",
                                    choices=("token", "sequence"))
    dynamic_sampling: bool = setting(False, "DAPO's dynamic sampling: groups whose scores are all equal give way to groups of newly drawn prompts, over at most max_sampling_rounds rounds of sampling per iteration")
    max_sampling_rounds: int = setting(3, "rounds of sampling per iteration at most with dynamic_sampling; a batch still short after them keeps some equal-score groups", at_least=1)
    overlong_buffer: int | None = setting(None, "DAPO's soft overlong punishment: over the last this many tokens of the response budget a response loses up to 1 of its score, linearly (none disables)", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        require(self.estimator != "rloo" or self.group_size >= 2, "group_size", self.group_size,
                "RLOO needs at least 2 samples per prompt for its leave-one-out baseline")
        batch = self.prompts_per_step * self.group_size
        require(self.minibatch_size <= batch, "minibatch_size", self.minibatch_size,
                f"must be <= prompts_per_step x group_size ({batch}), the responses it is cut from")


# ---------------------------------------------------------------------------------------------------
# the trainer


class GRPOTrainer(PolicyTrainer):
    """GRPO, Dr. GRPO or RLOO (`estimator`) on a PaLM with a reward model
    (`reward_model.score(seq, prompt_mask=, mask=) -> (b,)`) or a programmatic `reward_fn` of the same
    signature (`rl.text_reward_fn` turns a scorer of decoded text into one). Only the actor's LoRA
    is trained; the base, the reference (the base itself) and the reward model stay frozen.
    Settings: `config` (a GRPOConfig, default GRPOConfig()), any of its fields as keywords on top."""

    @beartype
    def __init__(self, *, palm: PaLM, reward_model: nn.Module | None = None, reward_fn=None, prompt_token_ids=None,
                 prompts: list[str] | None = None, tokenizer=None, config: GRPOConfig | None = None,
                 accelerator: Accelerator | None = None, accelerate_kwargs: dict | None = None, **settings):
        config = with_settings(config or GRPOConfig(), settings, "GRPOTrainer")
        super().__init__(palm=palm, reward_model=reward_model, reward_fn=reward_fn, prompt_token_ids=prompt_token_ids,
                         prompts=prompts, tokenizer=tokenizer, config=config, actor_scope=config.lora_scope,
                         accelerator=accelerator, accelerate_kwargs=accelerate_kwargs)
        self.kl = KLController(config.beta, config.kl_target, config.kl_horizon, config.kl_beta_floor)  # beta 0 stays 0
        self.add_scopes({config.lora_scope: config.lora_r})
        actor = Actor(palm, config.lora_scope)
        optimizer = torch.optim.AdamW(actor.actor_parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
        self.actor, self.optimizer = self.accelerator.prepare(actor, optimizer)

    @property
    def prepared(self) -> Actor:  # as Accelerate wrapped it: DDP, a DeepSpeed engine, FSDP
        return self.actor

    def rollout(self, prompts: list[torch.Tensor], max_seq_len: int | None = None, temperature: float | None = None,
                generator=None):
        """Steps 1-4 for a batch of prompts, G responses to each (sampled with `generator`)
        -> (GroupRollout, diagnostics)."""
        c, G = self.config, self.config.group_size
        temperature = c.temperature if temperature is None else temperature
        max_seq_len = max_seq_len or c.max_seq_len
        # 1. G samples of each prompt from one encoding of it; with dynamic_sampling, groups of new
        # prompts in place of those whose scores are all equal
        samples = self.draw_responses(prompts, max_seq_len, temperature, generator, group_size=G)
        constant = constant_groups(self.rewards(samples).view(-1, G))  # (P,)
        extra = {}
        if c.dynamic_sampling:
            samples, extra["extra_samples"] = self.resample_constant_groups(samples, constant, max_seq_len, temperature)
        # 2. their log-probs, and the reference's unless beta = 0
        samples = self.forward_passes(samples, temperature, reference=c.beta > 0)
        # 3. scores, less the missing-EOS penalty (and DAPO's overlong one) and, with kl_in="reward",
        # beta * KL of each response
        rewards = self.rewards(samples)
        groups = rewards.view(-1, G)  # (P, G)
        stats = dict(score=samples.scores.mean(), beta=self.kl.beta, **self.rollout_stats(samples), zero_variance_groups=constant.float().mean(), **extra)
        in_reward = samples.ref_log_probs is not None and c.kl_in == "reward"
        if samples.ref_log_probs is not None:
            kl_tokens = kl_penalty(samples.log_probs, samples.ref_log_probs, "k1", samples.response_mask)  # (P * G, r)
            kl = kl_tokens.sum(dim=1)  # (P * G,)
            stats["kl"] = kl.mean()
        # 4. group-relative advantages, one per response, or REINFORCE++'s, one per token
        if c.estimator in TOKEN_ESTIMATORS:
            advantages = reinforce_pp_advantages(groups, self.kl.beta * kl_tokens if in_reward else None,
                                                 samples.response_mask, baseline=TOKEN_ESTIMATORS[c.estimator])
        else:
            if in_reward:
                groups = (rewards - self.kl.beta * kl).view(-1, G)
            advantages = ADVANTAGE_ESTIMATORS[c.estimator](groups).view(-1)
        rollout = GroupRollout(samples.seq, samples.mask, advantages, samples.log_probs, samples.ref_log_probs,
                               samples.start, temperature, samples.budget, samples.is_weights)
        return rollout, {k: float(v) for k, v in stats.items()}

    def rewards(self, samples: Samples) -> torch.Tensor:
        """Each response's score less its missing-EOS penalty and, with overlong_buffer, DAPO's
        overlong penalty: (b,)."""
        rewards = samples.scores - samples.penalty
        if self.config.overlong_buffer is not None:
            lengths = samples.mask[:, samples.start:].sum(dim=1)
            rewards = rewards - overlong_penalty(lengths, samples.budget, self.config.overlong_buffer)
        return rewards

    def resample_constant_groups(self, samples: Samples, constant: torch.Tensor, max_seq_len: int,
                                 temperature: float) -> tuple[Samples, int]:
        """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): a group whose rewards are all equal
        has no advantage to learn from, so more prompts are drawn, G responses each, in up to
        max_sampling_rounds rounds in all, and the batch keeps as many groups as it had, informative
        ones first. constant: (P,) bool, which of the samples' groups have equal rewards
        -> (Samples before their forward passes, the extra responses drawn)."""
        c, G = self.config, self.config.group_size
        wanted = len(samples.seq) // G
        parts, informative = [samples], [~constant]
        for sampling_round in range(1, c.max_sampling_rounds):
            missing = torch.tensor([wanted - int(torch.cat(informative).sum())], device=self.device)
            missing = int(self.accelerator.gather(missing).max())  # every process samples the same rounds
            if missing <= 0:
                break
            prompts, generator = self.draw_prompts(missing, sampling_round)
            parts.append(self.draw_responses(prompts, max_seq_len, temperature, generator, group_size=G))
            informative.append(~constant_groups(self.rewards(parts[-1]).view(-1, G)))
        groups = chosen_groups(torch.cat(informative).cpu(), wanted)
        rows = (groups[:, None] * G + torch.arange(G)).view(-1)
        merged = merge_samples(parts, self.palm.pad_id)
        return select_rows(merged, rows.to(merged.seq.device)), len(merged.seq) - len(rows)

    def loss(self, mb: dict, rollout: GroupRollout, normalizers: Normalizers):
        """Step 5 on one micro-batch: the clipped surrogate and, with kl_in="loss", beta times the k3
        KL, aggregated by `loss_aggregation` over the minibatch -> (loss, diagnostics)."""
        c, resp_mask, tokens = self.config, mb["mask"][:, rollout.start:], normalizers.tokens
        with self.accelerator.autocast():
            log_probs, _ = self.actor(mb["seq"], mb["mask"], rollout.start, rollout.temperature)
        ratio_log_probs = log_probs  # the per-token ratio pi / pi_old, or GSPO's per response
        if c.importance_ratio == "sequence":
            ratio_log_probs = mb["log_probs"] + sequence_log_ratio(log_probs, mb["log_probs"], resp_mask)
        advantages = mb["advantages"] if mb["advantages"].dim() == 2 else mb["advantages"][:, None]  # (b, r) or (b, 1)
        surrogate, is_clipped = clipped_surrogate(ratio_log_probs, mb["log_probs"], advantages,
                                                  c.eps_clip, c.eps_clip_high, resp_mask)
        if mb.get("is_weights") is not None:  # the sampler-learner correction (rollout_precision.py)
            surrogate = surrogate * mb["is_weights"]
        policy_loss = aggregate_loss(surrogate, resp_mask, c.loss_aggregation, rollout.max_new_tokens, normalizers)
        # 6. diagnostics; approx KL(old || new) is the k3 estimate on the old policy's samples
        approx_kl = kl_penalty(mb["log_probs"], log_probs.detach(), "k3", resp_mask)
        diagnostics = dict(policy_loss=policy_loss, clip_fraction=token_mean(is_clipped.float(), resp_mask, tokens),
                           approx_kl=token_mean(approx_kl, resp_mask, tokens))
        if c.beta > 0 and c.kl_in == "loss":  # GRPO's per-token k3 KL(pi || pi_ref), differentiated through pi
            diagnostics["kl_loss"] = aggregate_loss(kl_penalty(log_probs, mb["ref_log_probs"], "k3", resp_mask), resp_mask,
                                                    c.loss_aggregation, rollout.max_new_tokens, normalizers)
            return policy_loss + self.kl.beta * diagnostics["kl_loss"], diagnostics
        return policy_loss, diagnostics

    def step(self, max_seq_len: int | None = None, prompts_per_step: int | None = None, temperature: float | None = None):
        """One iteration on `prompts_per_step` prompts (the config's by default) drawn for this
        process, `group_size` responses to each -> (diagnostics, rollout)."""
        prompts_per_step = prompts_per_step or self.config.prompts_per_step
        prompts, generator = self.draw_prompts(prompts_per_step)
        rollout, stats = self.rollout(prompts, max_seq_len, temperature, generator=generator)
        stats.update(self.learn(rollout))
        # as PPO's: the same diagnostics everywhere, so beta stays the same on every process
        stats = self.reduce_stats(stats)
        if "kl" in stats:
            self.kl.update(stats["kl"], prompts_per_step * self.config.group_size * self.accelerator.num_processes)
        return stats, rollout

    def train(self, num_episodes: int | None = None, max_seq_len: int | None = None, prompts_per_step: int | None = None,
              temperature: float | None = None, callback=None) -> list[dict]:
        """Training on `num_episodes` sampled responses (one episode = one prompt and its response; by
        default the config's iterations x prompts_per_step x group_size), in iterations of
        `prompts_per_step` x `group_size`. `callback(iteration, stats, rollout)` runs after each.
        Returns the diagnostics of every iteration."""
        prompts_per_step = prompts_per_step or self.config.prompts_per_step
        per_iteration = prompts_per_step * self.config.group_size
        iterations = self.config.iterations if num_episodes is None else max(1, math.ceil(num_episodes / per_iteration))
        return self.run_iterations(iterations, self.config.estimator, callback, max_seq_len=max_seq_len,
                                   prompts_per_step=prompts_per_step, temperature=temperature)
