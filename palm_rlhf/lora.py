"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) and the
named fine-tune scopes built from it.

    h = W0 x + (alpha / r) * B A x

A frozen weight W0 gets a trainable low-rank update. B starts at zero so an adapter is a no-op at
init: adding one to a trained model changes nothing until it is trained. The update can be merged
into W0 (`delta_weight`) so a tuned model runs at the base model's speed.

A scope is a named set of adapters on every layer's q, k, v and attention output, or trainable
copies of the last N layers (PaLM-rlhf-pytorch's "fine-tune only the last N layers"). Several scopes
on one frozen PaLM give it several roles (Hydra-RLHF, Santacroce et al. 2023): actor, critic, reward
model, each selected per forward call, and the base itself, with the adapters disabled, is the
frozen reference. `FinetuneScopes` is the part of `PaLM` (model.py) that manages them.
"""
import copy
import math

import torch
from torch import nn


class LoRA(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, r: int = 8, alpha: float | None = None):
        super().__init__()
        self.scale = (alpha if alpha is not None else r) / r
        # A gets Kaiming-like init, B zeros: the product starts at exactly zero
        self.A = nn.Parameter(torch.randn(dim_in, r) / math.sqrt(dim_in))
        self.B = nn.Parameter(torch.zeros(r, dim_out))

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's layout, (dim_out, dim_in), ready to add to a base weight."""
        return (self.A @ self.B).t() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A @ self.B) * self.scale


class FinetuneScopes:
    """Named fine-tune scopes on a PaLM (mixed into `model.PaLM`, whose `layers`, `config`,
    `token_emb` and `finetune_modules` they use)."""

    def add_finetune_params(self, scope: str, lora_r: int | None = 8, lora_alpha: float | None = None,
                            last_n_layers: int | None = None):
        """Adds a named scope: LoRA adapters on q, k, v and the attention output of every layer, or,
        with `last_n_layers=N`, trainable copies of the last N layers (the base stays frozen)."""
        if scope in self.finetune_modules:
            raise ValueError(f"fine-tune scope {scope!r} already exists")
        if last_n_layers is not None:
            if not 1 <= last_n_layers <= len(self.layers):
                raise ValueError(f"last_n_layers must be in 1..{len(self.layers)}, got {last_n_layers}")
            self.finetune_modules[scope] = copy.deepcopy(self.layers[-last_n_layers:]).requires_grad_(True)
            self.config.finetune_scopes[scope] = {"last_n_layers": last_n_layers}
            return
        c = self.config
        attn_inner = c.heads * c.dim_head
        self.finetune_modules[scope] = nn.ModuleList(
            nn.ModuleDict(dict(
                q=LoRA(c.dim, attn_inner, lora_r, lora_alpha),
                k=LoRA(c.dim, c.dim_head, lora_r, lora_alpha),
                v=LoRA(c.dim, c.dim_head, lora_r, lora_alpha),
                o=LoRA(attn_inner, c.dim, lora_r, lora_alpha),
            ))
            for _ in self.layers
        ).to(device=self.device, dtype=self.token_emb.weight.dtype)  # a bf16 model gets bf16 adapters
        self.config.finetune_scopes[scope] = {"lora_r": lora_r, "lora_alpha": lora_alpha}

    def remove_finetune_params(self, scope: str):
        self.finetune_modules.pop(self._check_scope(scope))
        self.config.finetune_scopes.pop(scope)

    def finetune_parameters(self, scope: str = "default"):
        return list(self.finetune_modules[self._check_scope(scope)].parameters())

    def freeze_base(self):
        """Freezes the base weights (everything outside the scopes); the scopes keep their state, so
        the roles already on this PaLM stay trainable."""
        for name, param in self.named_parameters():
            if not name.startswith("finetune_modules."):
                param.requires_grad_(False)
        return self

    def finetune_only(self, *scopes: str):
        """Freezes everything but the named scopes, so backward computes no gradient for the base."""
        self.requires_grad_(False)
        for scope in scopes:
            self.finetune_modules[self._check_scope(scope)].requires_grad_(True)
        return self

    @torch.no_grad()
    def merged_weights(self, scope: str) -> dict:
        """The base's parameters by name with `scope` folded in, as merge_finetune_params leaves them,
        this model unchanged: the weights a scope changes are new tensors, the others the base's own."""
        weights = {name: p for name, p in self.named_parameters() if not name.startswith("finetune_modules.")}
        modules = self.finetune_modules[self._check_scope(scope)]
        if "last_n_layers" in self.config.finetune_scopes[scope]:
            first = len(self.layers) - len(modules)
            for i, tuned in enumerate(modules):
                weights.update({f"layers.{first + i}.{name}": p for name, p in tuned.named_parameters()})
            return weights
        c = self.config
        q_end, k_end, v_end = c.heads * c.dim_head, c.heads * c.dim_head + c.dim_head, c.heads * c.dim_head + 2 * c.dim_head
        for i, (layer, lora) in enumerate(zip(self.layers, modules)):
            w_in = layer.fused_in.weight.clone()
            w_in[:q_end] += lora["q"].delta_weight()
            w_in[q_end:k_end] += lora["k"].delta_weight()
            w_in[k_end:v_end] += lora["v"].delta_weight()
            weights[f"layers.{i}.fused_in.weight"] = w_in
            weights[f"layers.{i}.attn_out.weight"] = layer.attn_out.weight + lora["o"].delta_weight()
        return weights

    @torch.no_grad()
    def merge_finetune_params(self, scope: str):
        """Folds a scope into the base weights and removes it: the merged model needs no adapters."""
        merged = self.merged_weights(scope)
        for name, param in self.named_parameters():
            if name in merged and merged[name] is not param:
                param.copy_(merged[name])
        self.remove_finetune_params(scope)

    def _check_scope(self, scope):
        if scope not in self.finetune_modules:
            raise KeyError(f"no fine-tune scope {scope!r}; this model has {list(self.finetune_modules)}")
        return scope

    def _layers_and_adapters(self, finetune_scope, disable_lora):
        """Per layer, (block, LoRA adapters or None) for the chosen scope."""
        if finetune_scope is None or disable_lora:
            return [(layer, None) for layer in self.layers]
        modules = self.finetune_modules[self._check_scope(finetune_scope)]
        if "last_n_layers" in self.config.finetune_scopes[finetune_scope]:
            return [(layer, None) for layer in self.layers[: len(self.layers) - len(modules)]] + [
                (layer, None) for layer in modules
            ]
        return list(zip(self.layers, modules))

