"""Everything this project asks of peft's LoRA layers, in one place (the range of peft versions it holds for is pinned
in pyproject.toml and checked by tests/guidance/test_lora.py): find the layers of a denoiser, read and set which
adapters they run (`active_adapters`, `set_adapter`), and compute one adapter's own term `B(A(x)) * scaling`.

Self-NPO needs that last term for some rows of a batch only, which no peft API offers: it reads the layer's public
`lora_A`, `lora_B`, `lora_dropout` and `scaling` modules of the adapter (the contract test checks that the term equals
what the layer adds for that adapter).
"""

from __future__ import annotations

import torch


def denoiser_of(pipe) -> torch.nn.Module:
    """The model a pipeline denoises with: its UNet, or its transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def lora_layers(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers of a denoiser."""
    from peft.tuners.lora import LoraLayer

    return [module for module in denoiser.modules() if isinstance(module, LoraLayer)]


def adapter_names(layers: list[torch.nn.Module]) -> set[str]:
    """Every adapter some layer holds."""
    return {name for layer in layers for name in layer.lora_A}


def active_adapters(layer: torch.nn.Module) -> list[str]:
    """The adapters a layer runs in its forward pass."""
    return list(layer.active_adapters)


def set_active_adapters(layers: list[torch.nn.Module], names: list[str]) -> None:
    """Make `names` (those each layer holds) the adapters the layers run, with peft's `set_adapter`, leaving every
    parameter's `requires_grad` as it was (peft's call also changes which adapters train)."""
    for layer in layers:
        trainable = [(parameter, parameter.requires_grad) for parameter in layer.parameters()]
        layer.set_adapter([name for name in names if name in layer.lora_A])
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)


def merged_adapters(layers: list[torch.nn.Module]) -> set[str]:
    """The adapters fused into the base weights of some layer."""
    return {name for layer in layers for name in layer.merged_adapters}


def variant_adapters(layers: list[torch.nn.Module]) -> set[str]:
    """The adapters that are DoRA or another LoRA variant (not plain `B(A(x))`)."""
    dora = {name for layer in layers for name, used in getattr(layer, "use_dora", {}).items() if used}
    return dora | {name for layer in layers for name in getattr(layer, "lora_variant", {})}


def lora_term(layer: torch.nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """`B(A(dropout(x))) * scaling` of one adapter of a LoRA layer (Linear or Conv): what it adds to the output."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    return lora_b(lora_a(layer.lora_dropout[adapter](x.to(lora_a.weight.dtype)))) * layer.scaling[adapter]


def add_lora(denoiser: torch.nn.Module, name: str, rank: int, alpha: float, target_modules: list[str]) -> None:
    """A new plain LoRA adapter `name` on `denoiser`'s `target_modules` (diffusers' `add_adapter`; B starts at 0)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    denoiser.add_adapter(config, adapter_name=name)


def adapter_state_dict(denoiser: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The weights of adapter `name`, in diffusers' LoRA layout (what `save_lora_weights` writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=name))
