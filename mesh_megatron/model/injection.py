"""Input injection and state initialisation of the loop (docs/MESH_METHOD.md section 7c;
Huginn, arXiv 2502.05171): what the core reads, and where the loop's state starts.

    e   = h_pre (the prelude's output)
    h_0 = e (state_init: prelude), or a truncated-normal draw (state_init: noise; zeros in eval)
    core reads  h_t              (input_injection: none)
                h_t + e          (add)
                A [h_t; e]       (concat-adapter: A a Linear(2h -> h) without bias, Huginn's adapter)

The state passing (state_passing.py) still sees h_t and core's output; its anchors keep the
prelude's output (carry h0 = e) whatever the state starts from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mesh_megatron.config import ModelConfig


class InputInjection(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.mode, self.state_init = config.input_injection, config.state_init
        h = config.hidden_size
        # Huginn: std of the weights' init, times the embedding scale, truncated at 3 std.
        self.noise_std = config.weight_init_std * config.embedding_multiplier
        self.adapter = nn.Linear(2 * h, h, bias=False) if self.mode == "concat-adapter" else None
        if self.adapter is not None:  # starts as the `add` injection: A = [I, I]
            with torch.no_grad():
                self.adapter.weight.copy_(torch.cat([torch.eye(h), torch.eye(h)], dim=1))

    def initial_state(self, h0: Tensor, training: bool) -> Tensor:
        """The state entering the loop: h0 itself, or noise in training and zeros in eval."""
        if self.state_init == "prelude":
            return h0
        if not training:
            return torch.zeros_like(h0)
        std = self.noise_std
        x = torch.empty_like(h0)
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return x

    def core_input(self, h: Tensor, e: Tensor) -> Tensor:
        if self.mode == "none":
            return h
        if self.mode == "add":
            return h + e
        return self.adapter(torch.cat([h, e], dim=-1))


def build_injection(config: ModelConfig):
    """None unless the config asks for injection or a noise state (today's loop exactly)."""
    if config.input_injection == "none" and config.state_init == "prelude":
        return None
    return InputInjection(config)
