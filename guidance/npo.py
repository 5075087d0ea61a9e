"""Self-NPO's negative-preference model in CFG's unconditional branch (Self-NPO, arXiv 2505.11777; Diffusion-NPO,
ICLR 2025), without a second copy of the model: `eps = eps_neg(x_t) + w (eps(x_t, c) - eps_neg(x_t))`.

The negative weights are `theta_neg = theta + alpha * eta + beta * delta` (the Diffusion-NPO formula): `eta` is the
NPO offset, a LoRA adapter loaded into the denoiser (`pipe.load_lora_weights(folder, adapter_name="npo")`), and
`delta` an optional fine-tune offset, another LoRA adapter that the conditional rows use at its active weight. The
conditional and the unconditional rows run in ONE batched forward pass: a forward hook on every LoRA layer adds
`alpha * B(A(x))` (and `(beta - 1) * delta`'s) to the unconditional rows only, so NPO costs about what CFG costs. The
adapter is taken out of the active adapters while the pass runs (the conditional rows never see it) and put back on
exit; hooks are removed on exit.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from .checks import check_number
from .lora import (
    active_adapters,
    adapter_names,
    denoiser_of,
    lora_layers,
    lora_term,
    merged_adapters,
    set_active_adapters,
    variant_adapters,
)
from .unconditional import UnconditionalModel


class NegativeAdapter(UnconditionalModel):
    """The unconditional rows computed by `theta + alpha * eta + beta * delta`, in the conditional rows' pass.

    Args:
        adapter_name: the LoRA adapter holding the NPO offset `eta` ("npo").
        alpha: its weight (the public code fixes 1).
        delta_adapter: a fine-tune's LoRA adapter, active for the conditional rows (None: none).
        beta: its weight in the negative model (1: as the conditional rows; the public code uses `1 - merge_weight`).
    """

    shares_pass = True

    def __init__(self, adapter_name: str = "npo", alpha: float = 1.0, delta_adapter: str | None = None, beta=1.0):
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"`adapter_name` must be a non-empty string, got {adapter_name!r}")
        alpha, beta = check_number("alpha", alpha), check_number("beta", beta)
        if delta_adapter is not None and (not isinstance(delta_adapter, str) or delta_adapter == adapter_name):
            raise ValueError(f"`delta_adapter` must be another adapter's name or None, got {delta_adapter!r}")
        self.adapter_name, self.alpha, self.delta_adapter, self.beta = adapter_name, float(alpha), delta_adapter, beta

    def _terms(self) -> list[tuple[str, float]]:
        terms = [(self.adapter_name, self.alpha)]
        if self.delta_adapter is not None and self.beta != 1.0:
            terms.append((self.delta_adapter, float(self.beta) - 1.0))
        return terms

    def _check(self, layers: list[torch.nn.Module]) -> None:
        names = adapter_names(layers)
        for name in [self.adapter_name] + ([self.delta_adapter] if self.delta_adapter else []):
            if name not in names:
                raise ValueError(
                    f"the denoiser has no LoRA adapter {name!r} (it has {sorted(names)}): load it with "
                    f"`pipe.load_lora_weights(folder, adapter_name={name!r})`"
                )
        if self.delta_adapter is not None:
            holding = [layer for layer in layers if self.delta_adapter in layer.lora_A]
            inactive = [layer for layer in holding if self.delta_adapter not in active_adapters(layer)]
            if inactive:
                raise ValueError(
                    f"`delta_adapter` {self.delta_adapter!r} must be active (the fine-tune the conditional rows use): "
                    f"`pipe.set_adapters([{self.delta_adapter!r}])`"
                )
        if self.adapter_name in merged_adapters(layers):
            raise ValueError(
                f"adapter {self.adapter_name!r} is fused into the weights: unfuse it (`pipe.unfuse_lora()`)"
            )
        variants = sorted(variant_adapters(layers))
        if variants:
            raise ValueError(f"adapters {variants} are DoRA or another LoRA variant; NegativeAdapter takes plain LoRA")

    @contextlib.contextmanager
    def rows_context(self, denoiser: torch.nn.Module, branches: list[str]) -> Iterator[None]:
        rows = [i for i, branch in enumerate(branches) if branch == "uncond"]
        layers = lora_layers(denoiser)
        self._check(layers)
        terms = self._terms()

        block = rows == list(range(rows[0], rows[0] + len(rows))) if rows else False  # the usual case: a slice
        indices: dict[torch.device, torch.Tensor] = {}

        def index(device: torch.device) -> torch.Tensor:  # made once per device and pass, not per layer
            if device not in indices:
                indices[device] = torch.tensor(rows, device=device)
            return indices[device]

        def add_to_unconditional_rows(layer, args, output):
            x = args[0]
            if x.shape[0] != len(branches):
                raise RuntimeError(f"a LoRA layer saw a batch of {x.shape[0]} rows in a pass of {len(branches)}")
            if block:
                picked = x[rows[0] : rows[0] + len(rows)]
            else:
                picked = x[index(x.device)]
            extra = sum(weight * lora_term(layer, name, picked) for name, weight in terms if name in layer.lora_A)
            if isinstance(extra, int):
                return output
            if block and not torch.is_grad_enabled():
                output[rows[0] : rows[0] + len(rows)] += extra.to(output.dtype)
                return output
            return output.index_add(0, index(x.device), extra.to(output.dtype))

        saved = [(layer, active_adapters(layer)) for layer in layers]
        handles = []
        try:
            for layer, active in saved:  # never on the conditional rows, even when loaded active
                set_active_adapters([layer], [name for name in active if name != self.adapter_name])
                if rows:
                    handles.append(layer.register_forward_hook(add_to_unconditional_rows))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, active in saved:
                set_active_adapters([layer], active)

    def __repr__(self) -> str:
        delta = f", delta_adapter={self.delta_adapter!r}, beta={self.beta}" if self.delta_adapter else ""
        return f"NegativeAdapter({self.adapter_name!r}, alpha={self.alpha}{delta})"


def size_mismatch(error: Exception, folder, denoiser: torch.nn.Module) -> ValueError | None:
    """A short error for torch's list of every LoRA tensor of another shape than the denoiser's (None: another
    error, or one of another model of the pipeline, e.g. its text encoder)."""
    pattern = (
        r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) from checkpoint, "
        r"the shape in current model is (torch\.Size\(\[[\d, ]*\]\))"
    )
    mismatched = re.findall(pattern, str(error))
    if not isinstance(error, RuntimeError) or f"for {type(denoiser).__name__}:" not in str(error) or not mismatched:
        return None
    name, theirs, ours = mismatched[0]
    return ValueError(
        f"{str(folder)!r} does not fit this pipeline's {type(denoiser).__name__}: {len(mismatched)} of "
        f"its LoRA tensors have other shapes (e.g. {name}: {theirs} in the folder, {ours} in the "
        "model): was it trained for another model?"
    )


def load_npo_adapter(pipe, folder, adapter_name: str = "npo", **kwargs) -> NegativeAdapter:
    """Load a diffusers-format LoRA folder (a Self-NPO or Diffusion-NPO release) into `pipe` as `adapter_name`, off
    for every pass but the unconditional rows of a policy given the returned `NegativeAdapter(adapter_name, **kwargs)`
    as its `unconditional`."""
    denoiser = denoiser_of(pipe)
    if adapter_name in adapter_names(lora_layers(denoiser)):  # loading again replaces it
        pipe.delete_adapters(adapter_name)
    active = {layer: active_adapters(layer) for layer in lora_layers(denoiser)}
    try:
        pipe.load_lora_weights(folder, adapter_name=adapter_name)
    except Exception as error:
        for layer in lora_layers(denoiser):  # peft switches on the adapters left when it deletes the failed one
            set_active_adapters([layer], active.get(layer, []))
        readable = size_mismatch(error, folder, denoiser)
        if readable is None:
            raise
        raise readable from error
    if adapter_name not in adapter_names(lora_layers(denoiser)):
        raise ValueError(
            f"{str(folder)!r} holds no LoRA weights for this pipeline's {type(denoiser).__name__}: "
            "was it trained for another model?"
        )
    for layer in lora_layers(denoiser):
        set_active_adapters([layer], [name for name in active_adapters(layer) if name != adapter_name])
    return NegativeAdapter(adapter_name, **kwargs)
