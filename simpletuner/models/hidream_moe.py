"""HiDream's mixture-of-experts load-balancing term (hidream_use_load_balancing_loss).

Every feed-forward layer of HiDream's transformer routes each token to a few of
its experts through a learnt gate (diffusers' ``MoEGate``). diffusers computes the
gate's balance term but drops it, so training sees nothing of it. Here a forward
hook on every gate recomputes it while ``predict`` runs, in the Switch Transformer
form: ``experts * sum_e(mean router probability of e * share of picks going to e)``,
which is 1.0 when the router spreads tokens evenly and grows as it favours a few
experts. The family adds the sum over all gates, times
hidream_load_balancing_loss_weight, to the training loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

GATE_CLASS_NAME = "MoEGate"  # diffusers.models.transformers.transformer_hidream_image.MoEGate


def router_gates(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every MoE gate inside ``transformer`` (found through DDP / compile wrappers)."""
    return [module for module in transformer.modules() if type(module).__name__ == GATE_CLASS_NAME]


def dequantize_router_weights(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Plain ``dtype`` weights for gates read quantised from a GGUF file.

    GGUF files quantise the gates' (experts x width) matrices like any other, but MoEGate multiplies its weight
    directly (it is no Linear layer, which diffusers would swap for one that dequantises), so it must hold plain
    values.
    """
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    for gate in router_gates(transformer):
        if isinstance(gate.weight, GGUFParameter):
            gate.weight = torch.nn.Parameter(dequantize_gguf_tensor(gate.weight).to(dtype), requires_grad=False)


def balance_term(hidden: torch.Tensor, gate_weight: torch.Tensor, chosen: torch.Tensor, experts: int) -> torch.Tensor:
    """The Switch balance term of one gate for its input ``hidden`` (..., dim) and picked experts ``chosen``."""
    tokens = hidden.reshape(-1, hidden.shape[-1]).float()
    probabilities = F.linear(tokens, gate_weight.float()).softmax(dim=-1)
    share = F.one_hot(chosen.reshape(-1), num_classes=experts).float().mean(dim=0)
    return experts * (probabilities.mean(dim=0) * share).sum()


class RouterBalance:
    """Collects each gate's balance term during one transformer call."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []

    def _record(self, gate: torch.nn.Module, inputs: tuple, outputs: tuple) -> None:
        chosen = outputs[0]  # MoEGate returns (expert indices, their weights, its own aux loss or None)
        self.terms.append(balance_term(inputs[0], gate.weight, chosen, gate.n_routed_experts))

    @contextmanager
    def recording(self, transformer: torch.nn.Module) -> Iterator[None]:
        """Hooks on every gate of ``transformer`` (found through wrappers) for the body; terms start empty."""
        self.terms = []
        gates = router_gates(transformer)
        if not gates:
            raise ValueError(f"hidream_use_load_balancing_loss is set, but {type(transformer).__name__} has no "
                             "mixture-of-experts gates (num_routed_experts=0); turn the option off")
        handles = [gate.register_forward_hook(self._record) for gate in gates]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def take(self) -> torch.Tensor | None:
        """The summed terms of the last recorded call (then forgotten), or None when nothing was recorded."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).sum() if terms else None
