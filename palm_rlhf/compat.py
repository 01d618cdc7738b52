"""PaLM-rlhf-pytorch's keywords, mapped onto this library's, so that code written for that package
runs here with its package name changed (docs/coming-from-palm-rlhf-pytorch.md).

Each table maps one of that package's keywords to ours: a new name (`Renamed`), or `Ignored` with
the reason it has no meaning here; ignored keywords are accepted and named in one warning per call.
A keyword and the one it is renamed to, passed together, are an error. Keywords the tables do not
name go through untouched, so a misspelt one still fails as Python says.

The core classes know nothing of this: `install()` (called once by palm_rlhf/__init__.py) wraps
their constructors and the methods that package had, so `palm_rlhf.PaLM` is `palm_rlhf.model.PaLM`
and takes both packages' keywords.
"""
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Renamed:
    ours: str


@dataclass(frozen=True)
class Ignored:
    reason: str


def translate(kwargs: dict, table: dict, where: str) -> dict:
    """kwargs with the table's keywords renamed and its ignored ones dropped (with one warning)."""
    out, ignored = {}, []
    for key, value in kwargs.items():
        rule = table.get(key)
        if isinstance(rule, Ignored):
            ignored.append(f"{key} ({rule.reason})")
        elif isinstance(rule, Renamed):
            if rule.ours in kwargs:
                raise TypeError(f"{where}: pass {rule.ours}= or PaLM-rlhf-pytorch's {key}=, not both")
            out[rule.ours] = value
        else:
            out[key] = value
    if ignored:
        warnings.warn(f"{where}: PaLM-rlhf-pytorch keywords with no meaning here, ignored: " + "; ".join(ignored),
                      stacklevel=3)
    return out


def upstream_keywords(table: dict, adapt=None):
    """Decorates a method so that it also takes PaLM-rlhf-pytorch's keywords: `table` renames or
    ignores them, then `adapt(kwargs) -> kwargs` (if given) handles those that change meaning."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            kwargs = translate(kwargs, table, method.__qualname__)
            return method(self, *args, **(adapt(kwargs) if adapt else kwargs))
        return wrapper
    return decorate


# ---------------------------------------------------------------------------------------------------
# the tables

PALM = {
    "cross_entropy_ignore_index": Renamed("pad_id"),
    "rotary_xpos_scale_base": Renamed("xpos_scale_base"),
    "qk_rmsnorm": Ignored("no query/key RMSNorm here; attention is plain scaled dot-product"),
}

GENERATE = {
    "pad_value": Renamed("pad_id"),
}



REWARD_MODEL = {
    "sample_from_bins": Ignored("the binned head's reward is the expected rating, never a sampled bin"),
    "sample_temperature": Ignored("the binned head's reward is the expected rating, never a sampled bin"),
}

RLHF_TRAINER = {
    "kl_div_loss_weight": Renamed("beta"),  # a KL penalty in the reward, here to the frozen reference
    "beta_s": Renamed("entropy_coef"),
    "actor_wd": Renamed("weight_decay"),
    "critic_wd": Renamed("critic_weight_decay"),
    "pad_value": Renamed("prompt_pad_id"),
    "max_norm": Renamed("max_grad_norm"),
    "actor_lora": Ignored("the actor is always a LoRA scope on the frozen base"),
    "critic_lora": Ignored("the critic is a LoRA scope, or a separate critic_palm trained whole"),
    "critic_pooled_values": Ignored("the critic gives one value per response token, for GAE"),
    "actor_dropout": Ignored("PPO runs without dropout, so the first ratio is exactly 1"),
    "critic_dropout": Ignored("PPO runs without dropout, so the first ratio is exactly 1"),
    "critic_num_pred_bins": Ignored("the value head is a scalar regressed with the clipped value loss"),
    "hl_gauss_loss_kwargs": Ignored("the value head is a scalar regressed with the clipped value loss"),
}

PPO_TRAIN = {
    "max_batch_size": Ignored("each PPO iteration samples its update_timesteps responses as one batch"),
}


def palm_scopes(kwargs: dict) -> dict:
    """PaLM-rlhf-pytorch's `finetune_scopes=("actor", ...)` with `lora_r=` -> our {scope: spec}."""
    kwargs = dict(kwargs)
    lora_r = kwargs.pop("lora_r", None)
    scopes = kwargs.get("finetune_scopes")
    if isinstance(scopes, (tuple, list)):
        kwargs["finetune_scopes"] = {scope: {"lora_r": lora_r or 8} for scope in scopes}
    elif lora_r is not None:
        warnings.warn("PaLM: PaLM-rlhf-pytorch keyword lora_r has no meaning here, ignored (a scope takes its "
                      "rank from add_finetune_params(scope, lora_r=))", stacklevel=3)
    return kwargs


def rlhf_trainer_inputs(kwargs: dict) -> dict:
    """`prompts_path=` (one prompt a line) -> `prompts=`; `critic=` (a PaLM) -> `critic_palm=`."""
    kwargs = dict(kwargs)
    if "prompts_path" in kwargs:
        lines = Path(kwargs.pop("prompts_path")).read_text().split("\n")
        kwargs["prompts"] = [line for line in lines if line]
    if "critic" in kwargs:
        critic = kwargs.pop("critic")
        if hasattr(critic, "token_rewards"):
            raise ValueError("an ImplicitPRM is a reward here, not a critic: pass it as reward_model= and PPO "
                             "adds its per-token rewards (PaLM-rlhf-pytorch used it as the critic)")
        kwargs["critic_palm"] = critic
    return kwargs


def ppo_episodes(kwargs: dict) -> dict:
    """PaLM-rlhf-pytorch's `train(num_episodes, max_timesteps, update_timesteps)` samples one response
    per timestep, num_episodes * max_timesteps in all, and makes a PPO update on every
    update_timesteps of them (a remainder is never learnt from). Here: num_episodes responses in
    iterations of rollout_batch_size, so num_episodes = the responses it learns from and
    rollout_batch_size = update_timesteps. Its defaults (500, 5000) apply to the one not passed."""
    if "max_timesteps" not in kwargs and "update_timesteps" not in kwargs:
        return kwargs
    if "rollout_batch_size" in kwargs:
        raise TypeError("train: pass rollout_batch_size= or PaLM-rlhf-pytorch's update_timesteps=, not both")
    kwargs = dict(kwargs)
    responses = kwargs.pop("num_episodes", 50000) * kwargs.pop("max_timesteps", 500)
    per_update = kwargs.pop("update_timesteps", 5000)
    if responses < per_update:
        raise ValueError(f"num_episodes * max_timesteps = {responses} responses is fewer than update_timesteps = "
                         f"{per_update}: no PPO update would run; lower update_timesteps")
    return dict(kwargs, num_episodes=responses // per_update * per_update, rollout_batch_size=per_update)


def sampling_filters(num_tokens: int, top_k, filter_thres, filter_logits_fn):
    """PaLM-rlhf-pytorch's filter arguments -> (top_k, a logits filter or None). Its default filter,
    with `filter_thres=t`, keeps the ceil((1 - t) * num_tokens) most likely tokens."""
    if filter_logits_fn is not None:
        thres = 0.9 if filter_thres is None else filter_thres
        return top_k, lambda logits: filter_logits_fn(logits, thres=thres)
    if filter_thres is not None:
        if top_k is not None:
            raise ValueError("pass top_k or filter_thres (PaLM-rlhf-pytorch's top-k fraction), not both")
        top_k = max(1, math.ceil((1 - filter_thres) * num_tokens))
    return top_k, None


def upstream_generate(generate):
    """PaLM.generate with that package's filters (`filter_thres`, `filter_logits_fn`), `pad_value`, and
    no prompt: one random token that is not the pad starts the sequence, returned whole, (1, seq_len)."""
    @functools.wraps(generate)
    def wrapper(self, seq_len, prompt=None, **kwargs):
        kwargs = translate(kwargs, GENERATE, "PaLM.generate")
        if "filter_thres" in kwargs or "filter_logits_fn" in kwargs:
            top_k, logits_filter = sampling_filters(self.num_tokens, kwargs.pop("top_k", None), kwargs.pop("filter_thres", None),
                                                    kwargs.pop("filter_logits_fn", None))
            kwargs.update(top_k=top_k, logits_filter=logits_filter)
        if prompt is None:
            prompt = torch.randint(0, self.num_tokens - 1, (1, 1))
            prompt = prompt + (prompt >= self.pad_id).long()
            kwargs["return_seq_without_prompt"] = False
        return generate(self, seq_len, prompt, **kwargs)
    return wrapper


def install():
    """Lets the classes take PaLM-rlhf-pytorch's keywords (the tables above), once."""
    from palm_rlhf.model import PaLM
    from palm_rlhf.ppo import RLHFTrainer
    from palm_rlhf.reward import RewardModel

    if getattr(PaLM, "_takes_upstream_keywords", False):
        return
    PaLM.__init__ = upstream_keywords(PALM, palm_scopes)(PaLM.__init__)
    PaLM.generate = upstream_generate(PaLM.generate)
    RewardModel.__init__ = upstream_keywords(REWARD_MODEL)(RewardModel.__init__)
    RLHFTrainer.__init__ = upstream_keywords(RLHF_TRAINER, rlhf_trainer_inputs)(RLHFTrainer.__init__)
    RLHFTrainer.train = upstream_keywords(PPO_TRAIN, ppo_episodes)(RLHFTrainer.train)
    PaLM._takes_upstream_keywords = True
