"""The contract with peft (guidance/lora.py, the one module that reaches it): what the project reads and sets on
peft's LoRA layers holds for the pinned peft versions. If an upgrade breaks one of these, widen the module, not its
callers."""

import pytest
import torch
from conftest import build

from guidance.lora import (
    active_adapters,
    adapter_names,
    adapter_state_dict,
    add_lora,
    denoiser_of,
    lora_layers,
    lora_term,
    merged_adapters,
    set_active_adapters,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


@pytest.fixture()
def unet():
    pipe = build("sd")
    denoiser = denoiser_of(pipe)
    assert denoiser is pipe.unet
    torch.manual_seed(0)
    for name in ("a", "b"):
        add_lora(denoiser, name, rank=2, alpha=2.0, target_modules=TARGETS)
    with torch.no_grad():
        for layer in lora_layers(denoiser):  # B starts at 0: make the adapters do something
            for name in ("a", "b"):
                layer.lora_B[name].weight.normal_(0, 0.1)
    return denoiser


def test_the_layers_and_their_adapters_are_found(unet):
    layers = lora_layers(unet)
    assert layers and adapter_names(layers) == {"a", "b"}
    kinds = {type(layer.base_layer).__name__ for layer in layers}
    assert kinds == {"Linear", "Conv2d"}


def test_setting_the_active_adapters_keeps_what_trains(unet):
    layers = lora_layers(unet)
    for parameter in unet.parameters():
        parameter.requires_grad_(False)
    layers[0].lora_A["a"].weight.requires_grad_(True)
    set_active_adapters(layers, ["b"])
    assert all(active_adapters(layer) == ["b"] for layer in layers)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is layers[0].lora_A["a"].weight
    set_active_adapters(layers, [])
    assert all(active_adapters(layer) == [] for layer in layers)


@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
def test_an_adapters_term_is_what_the_layer_adds_for_it(unet, kind):
    layer = next(layer for layer in lora_layers(unet) if type(layer.base_layer).__name__ == kind)
    unet.eval()
    shape = (3, layer.base_layer.in_features) if kind == "Linear" else (3, layer.base_layer.in_channels, 4, 4)
    x = torch.randn(shape)
    with torch.no_grad():
        set_active_adapters([layer], [])
        base = layer(x)
        set_active_adapters([layer], ["a"])
        with_a = layer(x)
        torch.testing.assert_close(with_a - base, lora_term(layer, "a", x), atol=1e-6, rtol=1e-5)
        set_active_adapters([layer], ["a", "b"])
        both = layer(x)
        torch.testing.assert_close(
            both - base, lora_term(layer, "a", x) + lora_term(layer, "b", x), atol=1e-6, rtol=1e-5
        )


def test_fused_adapters_are_seen_and_state_dicts_are_diffusers_layout(unet):
    layers = lora_layers(unet)
    assert merged_adapters(layers) == set()
    state = adapter_state_dict(unet, "a")
    parts = (".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.")  # diffusers' names (linear and conv layers)
    assert len(state) == 2 * len(layers) and all(any(part in key for part in parts) for key in state)
    first = layers[0]
    assert any(torch.equal(value, first.lora_B["a"].weight) for value in state.values())  # adapter "a"'s own
    assert not any(torch.equal(value, first.lora_B["b"].weight) for value in state.values())
    set_active_adapters(layers, ["a"])
    for layer in layers:
        layer.merge(adapter_names=["a"])
    assert merged_adapters(layers) == {"a"}
