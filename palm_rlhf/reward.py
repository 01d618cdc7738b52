"""Reward model: a PaLM with a reward head, as in PaLM-rlhf-pytorch's `RewardModel`.

Choices, and where they come from:

1. The base is shared, not copied (lucidrains deep-copies the PaLM). The reward model adds its own
   fine-tune scope to the PaLM it is given (LoRA adapters, Hu et al. 2021, or trainable copies of
   the last N layers) and freezes that PaLM's base weights, so one frozen base can serve actor,
   critic, reward model and reference (Hydra-RLHF, Santacroce et al. 2023). Other scopes already on
   the PaLM are left alone. `share_base=False` works on a copy, as lucidrains does, and leaves the
   given PaLM trainable.
2. The prompt/response split is known to the model through two learned segment embeddings added to
   the token embeddings (lucidrains' `prompt_embed` / `response_embed`). They start at zero, so a
   fresh reward model sees exactly what the base sees.
3. Where the score is read (`pool`). "mean" (the default): the mean of the final embeddings over
   every real token (prompt and response), then the head. "eos": the embedding at the last real
   token, the EOS ending the response, as in InstructGPT (Ouyang et al. 2022) and
   lm-human-preferences: in a causal model it is the one position that has seen the whole text.
   On the VADER movie snippets, from the same 20-minute byte-level base, the mean scored held-out
   pairs at 0.767 after 200 steps where the EOS read-out scored 0.609: a small model spreads
   sentiment over many positions and cannot yet gather it into one. Either way positions come from
   the mask, so any left or right padding gives the same score.
4. Two heads. Binned ratings (`num_binned_output=K`): a K-way classifier trained with cross-entropy,
   labels are class indices 0..K-1 (a rating of k stars is label k - 1, as in lucidrains); the
   scalar handed to RL is the expected rating sum_k p_k * k on the 1..K star scale. Scalar
   (`num_binned_output=0`): one number, trained on preference pairs with the Bradley-Terry loss
   (InstructGPT eq. 1, optionally with the Llama 2 margin), on given pairs or on every pair of a
   batch of rated texts (`all_pairs_bradley_terry_loss`), or regressed on float labels with MSE.
5. Dropout is applied to the pooled embedding before the head, not inside the shared base, so
   training the reward model never changes how the shared PaLM behaves for the other roles.

Sequences: [EOS] + prompt tokens + response tokens + [EOS], `prompt_mask` True on [EOS] + prompt.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palm_rlhf import checkpoint
from palm_rlhf.config import SettingError, check_settings, setting, with_settings
from palm_rlhf.model import PaLM, eval_mode
from palm_rlhf.tokenizer import PAD_ID, ByteTokenizer, pad

# ---------------------------------------------------------------------------------------------------
# losses and the scalar reward


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin=0.0) -> torch.Tensor:
    """Pairwise preference loss (Bradley & Terry 1952; InstructGPT eq. 1; Llama 2 eq. 2 with margin):

        loss = -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs.

    r_chosen, r_rejected (b,); margin a float or (b,) (Llama 2 makes it larger for clearer pairs).
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def all_pairs_bradley_terry_loss(rewards: torch.Tensor, ratings: torch.Tensor, min_gap: float = 1.0,
                                 margin=0.0) -> torch.Tensor:
    """Bradley-Terry over every pair of a batch of rated texts (InstructGPT section 3.5 trains on all
    K-choose-2 comparisons of a prompt at once): a batch of b texts, scored once, gives up to
    b(b-1)/2 pairs instead of b/2.

        loss = mean over (i, j) with ratings_i - ratings_j >= min_gap of -log sigmoid(r_i - r_j - margin)

    rewards, ratings (b,). A batch with no pair far enough apart gives a zero loss (still a graph).
    """
    preferred = (ratings[:, None] - ratings[None, :]) >= min_gap  # (b, b): i is preferred over j
    if not preferred.any():
        return rewards.sum() * 0.0
    reward_gaps = rewards[:, None] - rewards[None, :]  # (b, b): r_i - r_j
    return -F.logsigmoid(reward_gaps[preferred] - margin).mean()


def binned_rating_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of K-way rating logits (b, K) against class indices 0..K-1 (b,)."""
    return F.cross_entropy(logits, labels)


def expected_rating(logits: torch.Tensor) -> torch.Tensor:
    """E[rating] = sum_k softmax(logits)_k * k on the 1..K star scale: (b, K) -> (b,)."""
    stars = torch.arange(1, logits.shape[-1] + 1, device=logits.device, dtype=torch.float32)
    return logits.float().softmax(dim=-1) @ stars


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """How often the chosen side scores higher, (b,) each; a tie counts half, so a scorer that cannot
    tell the sides apart (a policy equal to its reference, for DPO's implicit reward) scores 0.5."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row of mask (b, n) -> (b,): where the score is read."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return positions.masked_fill(~mask, -1).amax(dim=1)


# ---------------------------------------------------------------------------------------------------
# sequences


def split_prompt(text: str, n_words: int = 4) -> tuple:
    """A plain rated text as (prompt, response): its first `n_words` words, then the rest.

    The words are joined with single spaces exactly as `data.review_prompts` makes PPO's prompts,
    so the reward model is trained on the same prompt/response split that PPO will give it. The
    response keeps at least one word.
    """
    words = text.split()
    n = min(n_words, len(words) - 1)
    if n <= 0:
        return "", text
    return " ".join(words[:n]), " " + " ".join(words[n:])


def encode_reward_input(prompt: str, response: str, max_len: int | None = None, ended: bool = True,
                        tokenizer=None) -> tuple:
    """(seq, prompt_mask), both (n,): [EOS] + prompt + response + [EOS], prompt_mask on [EOS] + prompt.

    Prompt and response are encoded apart, as a policy's response starts at a token boundary after
    its prompt (BPE would merge across a joined text). With `max_len` (tokens), the response is cut
    so that the sequence still ends with its EOS. `ended=False` leaves the closing EOS out, as RL
    scores a sampled response that reached the length limit. `tokenizer`: bytes by default.
    """
    tokenizer = tokenizer or ByteTokenizer()
    prompt_ids = tokenizer.encode_prompt(prompt).tolist()
    response_ids = tokenizer.encode(response).tolist()
    if max_len is not None:
        if len(prompt_ids) + 1 >= max_len:
            raise ValueError(f"a prompt of {len(prompt_ids) - 1} tokens leaves no room for a response in max_len={max_len}")
        response_ids = response_ids[: max_len - len(prompt_ids) - 1]
    seq = torch.tensor(prompt_ids + response_ids + [tokenizer.eos_id] * ended)
    prompt_mask = torch.arange(len(seq)) < len(prompt_ids)
    return seq, prompt_mask


def pad_right(seqs: list, prompt_masks: list, pad_id: int = PAD_ID) -> tuple:
    """Lists of 1-D (seq, prompt_mask) -> right-padded seq, prompt_mask, mask, each (b, n)."""
    seq, mask = pad(seqs, pad_id)
    prompt_mask, _ = pad([p.long() for p in prompt_masks], 0)
    return seq, prompt_mask.bool(), mask


@torch.no_grad()
def score_texts(reward_model, sides: list, batch_size: int = 64, max_len: int | None = 256, ended: list | None = None,
                return_logits: bool = False) -> torch.Tensor:
    """The reward of each (prompt, response) text, (N,), without dropout, in the model's tokenizer;
    with return_logits the head's raw output, (N, K) or (N,). `ended[i]` False leaves out the closing
    EOS, as RL scores a response cut at the length limit. Batches are sorted by length (less padding)."""
    palm, ended = reward_model.palm, ended or [True] * len(sides)
    order = sorted(range(len(sides)), key=lambda i: len(sides[i][0]) + len(sides[i][1]))
    outputs = []
    with eval_mode(reward_model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encoded = [encode_reward_input(*sides[i], max_len=max_len, ended=ended[i], tokenizer=palm.tokenizer) for i in chunk]
            seq, prompt_mask, mask = (t.to(palm.device) for t in pad_right(*zip(*encoded), pad_id=palm.pad_id))
            outputs.append(reward_model(seq, mask=mask, prompt_mask=prompt_mask, return_logits=return_logits).float().cpu())
    return torch.cat(outputs)[torch.tensor(order).argsort()]


# ---------------------------------------------------------------------------------------------------
# the model


@dataclass
class RewardConfig:
    """The reward model train_reward.py trains, and its defaults: `RewardModel.from_config(palm)` is it.
    (RewardModel's own keywords keep PaLM-rlhf-pytorch's defaults, a LoRA scope.)"""

    mode: str = setting("pairwise", "pairwise (scalar, Bradley-Terry) or binned (K-way rating classifier)", choices=("pairwise", "binned"))
    num_bins: int = setting(5, "rating bins (stars) of the binned head", at_least=2)
    lora_r: int = setting(8, "LoRA rank of the reward scope (with --finetune_last_n_layers none)", at_least=1)
    finetune_last_n_layers: int | None = setting(3, "tune copies of the last N layers; 'none' tunes a LoRA scope of rank --lora_r instead", at_least=1)
    pool: str = setting("mean", "where the score is read: mean (over all real tokens) or eos (the final EOS)", choices=("mean", "eos"))
    dropout: float = setting(0.1, "dropout on the pooled embedding before the head", at_least=0, at_most=1)

    def __post_init__(self):
        check_settings(self)


class RewardModel(nn.Module):
    def __init__(
        self,
        palm: PaLM,
        num_binned_output: int = 0,
        use_lora: bool = True,
        lora_r: int = 8,
        reward_lora_scope: str = "reward",
        finetune_last_n_layers: int | None = None,
        dropout: float = 0.1,
        pool: str = "mean",
        share_base: bool = True,
    ):
        """Adds the scope `reward_lora_scope` to `palm` (LoRA of rank `lora_r`, or with
        `finetune_last_n_layers=N` trainable copies of its last N layers) and freezes its base;
        with share_base=False, to a copy of `palm`, which stays as it was.
        With use_lora=False and no finetune_last_n_layers, the whole given PaLM is fine-tuned."""
        super().__init__()
        if not share_base:
            palm = copy.deepcopy(palm)
        if num_binned_output == 1:
            raise ValueError("num_binned_output=1 is not a classifier; use 0 for a scalar reward")
        if pool not in ("eos", "mean"):
            raise ValueError(f"pool must be 'eos' (the final EOS) or 'mean' (over the real tokens), got {pool!r}")
        self.pool = pool
        self.palm = palm
        self.args = dict(num_binned_output=num_binned_output, use_lora=use_lora, lora_r=lora_r,
                         reward_lora_scope=reward_lora_scope, finetune_last_n_layers=finetune_last_n_layers,
                         dropout=dropout, pool=pool)
        self.num_binned_output = num_binned_output
        tunes_scope = use_lora or finetune_last_n_layers is not None
        self.scope = reward_lora_scope if tunes_scope else None
        if finetune_last_n_layers is not None:
            palm.add_finetune_params(reward_lora_scope, lora_r=None, last_n_layers=finetune_last_n_layers)
        elif use_lora:
            palm.add_finetune_params(reward_lora_scope, lora_r=lora_r)
        if tunes_scope:  # freeze the base only: other roles' scopes on the same PaLM stay as they are
            palm.freeze_base()

        dim = palm.dim
        self.prompt_embed = nn.Parameter(torch.zeros(dim, device=palm.device))
        self.response_embed = nn.Parameter(torch.zeros(dim, device=palm.device))
        self.dropout = nn.Dropout(dropout)
        self.to_pred = nn.Linear(dim, max(1, num_binned_output), device=palm.device)

    @classmethod
    def from_config(cls, palm: PaLM, config: RewardConfig | None = None, **settings) -> "RewardModel":
        """The reward model `config` describes (default RewardConfig(), train_reward.py's), on `palm`."""
        c = with_settings(config or RewardConfig(), settings, "RewardModel.from_config")
        if c.finetune_last_n_layers is not None and c.finetune_last_n_layers > len(palm.layers):
            raise SettingError("finetune_last_n_layers", c.finetune_last_n_layers,
                               f"the PaLM has {len(palm.layers)} layers: pass at most {len(palm.layers)}, or none for a LoRA scope")
        return cls(palm, num_binned_output=c.num_bins if c.mode == "binned" else 0, lora_r=c.lora_r,
                   finetune_last_n_layers=c.finetune_last_n_layers, dropout=c.dropout, pool=c.pool)

    def finetune_parameters(self) -> list:
        """What the optimizer trains: head, segment embeddings, and the scope (or the whole PaLM)."""
        own = [self.prompt_embed, self.response_embed, *self.to_pred.parameters()]
        tuned = self.palm.finetune_parameters(self.scope) if self.scope else list(self.palm.parameters())
        return own + tuned

    def forward(self, seq, mask=None, prompt_mask=None, labels=None, return_logits=False, prompt_lengths=None):
        """seq (b, n) token ids; mask (b, n) True at real tokens (default: seq != PAD);
        prompt_mask (b, n) True on the prompt (default: no prompt), or `prompt_lengths` (b,), the
        prompt being each row's first tokens.

        labels given: the loss (binned: class indices 0..K-1 with cross-entropy; scalar: float
        targets with MSE). Otherwise the reward (b,), the expected 1..K rating for the binned head;
        with return_logits the head's raw output, (b, K) or (b,).
        """
        if mask is None:
            mask = seq != self.palm.pad_id
        if prompt_lengths is not None:
            if prompt_mask is not None:
                raise ValueError("pass prompt_mask or prompt_lengths, not both")
            prompt_mask = torch.arange(seq.shape[1], device=seq.device) < prompt_lengths.to(seq.device)[:, None]
        if prompt_mask is None:
            prompt_mask = torch.zeros_like(mask)
        # (b, n, D): the segment embedding of each position, added to its token embedding
        segment = torch.where(prompt_mask[..., None], self.prompt_embed, self.response_embed)
        embeds = self.palm(seq, mask=mask, finetune_scope=self.scope, return_only_embedding=True,
                           extra_embed=segment.to(self.palm.token_emb.weight.dtype))
        if self.pool == "eos":
            pooled = embeds[torch.arange(len(seq), device=seq.device), last_token_index(mask)]  # (b, D)
        else:
            weights = mask.float() / mask.float().sum(dim=1, keepdim=True)  # (b, n), 0 at padding
            pooled = torch.einsum("b n d, b n -> b d", embeds.float(), weights).to(embeds.dtype)
        # the head keeps its own dtype: a base shared with a policy that DeepSpeed casts to bf16 stays fp32 here
        logits = self.to_pred(self.dropout(pooled.to(self.to_pred.weight.dtype)))
        if not self.num_binned_output:
            logits = logits.squeeze(-1)  # (b,)

        if labels is not None:
            if self.num_binned_output:
                return binned_rating_loss(logits, labels)
            return F.mse_loss(logits.float(), labels.float())
        if return_logits:
            return logits
        return expected_rating(logits) if self.num_binned_output else logits.float()

    def score(self, seq, prompt_mask=None, mask=None) -> torch.Tensor:
        """The scalar reward for RL, (b,): expected rating (binned head) or the raw scalar, always
        without dropout, whatever mode the model was left in."""
        with eval_mode(self):
            return self(seq, mask=mask, prompt_mask=prompt_mask)

    def pairwise_loss(self, chosen_seq, rejected_seq, chosen_prompt_mask=None, rejected_prompt_mask=None,
                      chosen_mask=None, rejected_mask=None, margin=0.0) -> torch.Tensor:
        """Bradley-Terry loss of a batch of pairs, scored in one forward pass."""
        def rows(seq, prompt_mask, mask):
            mask = seq != self.palm.pad_id if mask is None else mask
            prompt_mask = torch.zeros_like(mask) if prompt_mask is None else prompt_mask
            return [(s[m], p[m]) for s, p, m in zip(seq, prompt_mask, mask)]

        both = rows(chosen_seq, chosen_prompt_mask, chosen_mask) + rows(rejected_seq, rejected_prompt_mask, rejected_mask)
        seq, prompt_mask, mask = (t.to(chosen_seq.device) for t in pad_right(*zip(*both), self.palm.pad_id))
        rewards = self(seq, mask=mask, prompt_mask=prompt_mask)
        return bradley_terry_loss(*rewards.chunk(2), margin=margin)

    # --- checkpoints ------------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """`checkpoint.save_reward_model`: the head, segment embeddings and scope, the base beside them."""
        return checkpoint.save_reward_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory, palm: PaLM | None = None, scope: str | None = None) -> "RewardModel":
        """`checkpoint.load_reward_model`: onto `palm` (its base checked by checksum) under `scope`, or
        onto the base saved with it; in eval mode."""
        return checkpoint.load_reward_model(cls, directory, palm, scope, palm_class=PaLM)


class RewardEnsemble(nn.Module):
    """Reward models trained apart (other seeds), scored together and combined conservatively, so
    that a policy gains only where they agree (Coste et al. 2023, "Reward Model Ensembles Help
    Mitigate Overoptimization"). Each member's score is first standardised by its mean and standard
    deviation on calibration texts (`calibrate`), since each Bradley-Terry head has its own offset
    and scale; then, over the k members:

        mean:  R = mean_i R_i
        min:   R = min_i R_i                                   (worst-case optimisation, WCO)
        uwo:   R = mean_i R_i - lambda * var_i R_i             (uncertainty-weighted, UWO, eq. 6)

    Members can share one frozen base, each with its own scope (`RewardModel.from_pretrained(dir,
    palm=palm, scope=...)`). `score` has RewardModel's signature, so the RL trainers take it as a
    reward_model.
    """

    COMBINES = ("mean", "min", "uwo")

    def __init__(self, reward_models: list, combine: str = "uwo", uncertainty_weight: float = 1.0):
        super().__init__()
        if combine not in self.COMBINES:
            raise ValueError(f"combine must be one of {', '.join(self.COMBINES)}, got {combine!r}")
        if len(reward_models) < 2:
            raise ValueError("an ensemble needs at least two reward models")
        self.reward_models = nn.ModuleList(reward_models)
        self.combine, self.uncertainty_weight = combine, uncertainty_weight
        device = reward_models[0].palm.device
        self.register_buffer("shift", torch.zeros(len(reward_models), device=device))
        self.register_buffer("scale", torch.ones(len(reward_models), device=device))

    def raw_scores(self, seq, prompt_mask=None, mask=None) -> torch.Tensor:
        """(k, b): every member's own score."""
        return torch.stack([model.score(seq, prompt_mask=prompt_mask, mask=mask) for model in self.reward_models])

    @torch.no_grad()
    def calibrate(self, seq, prompt_mask, mask, batch_size: int = 64):
        """Sets each member's shift and scale to the mean and std of its scores on these sequences
        (scored without dropout, as `score` always is)."""
        batches = zip(seq.split(batch_size), prompt_mask.split(batch_size), mask.split(batch_size))
        raw = torch.cat([self.raw_scores(*batch) for batch in batches], dim=1)
        self.shift.copy_(raw.mean(dim=1))
        self.scale.copy_(raw.std(dim=1).clamp_min(1e-6))
        return self

    def score(self, seq, prompt_mask=None, mask=None) -> torch.Tensor:
        """(b,): the members' standardised scores, combined."""
        scores = (self.raw_scores(seq, prompt_mask, mask) - self.shift[:, None]) / self.scale[:, None]
        if self.combine == "min":
            return scores.min(dim=0).values
        mean = scores.mean(dim=0)
        if self.combine == "mean":
            return mean
        return mean - self.uncertainty_weight * scores.var(dim=0, unbiased=False)

    forward = score

