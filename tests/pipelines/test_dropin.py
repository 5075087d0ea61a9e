"""The pipeline tester: what a diffusers user touches, on each of the four guided classes with tiny components built
after `torch.manual_seed(0)`. Every feature is checked twice against the diffusers parent running the same call:
without `guidance=` the images are bitwise diffusers', and with `guidance=ClassifierFreeGuidance(s)` they equal
diffusers' at its own scale `s` (<= 1e-5). Written here, after what diffusers' own fast tests check."""

import inspect

import numpy as np
import pytest
import torch
from conftest import REFERENCE, build, call_kwargs, seeded

from guidance import ClassifierFreeGuidance
from guidance.lora import adapter_state_dict, add_lora, denoiser_of

FAMILIES = list(REFERENCE)
SCALE = 4.0
PROMPT = "a red circle"


def scale_argument(family: str, scale: float = SCALE) -> dict:
    """diffusers' own CFG at `scale`: Flux's true CFG needs a negative prompt (the guided one takes "" by default)."""
    name = REFERENCE[family][2]
    return {name: scale, "negative_prompt": ""} if family == "flux" else {name: scale}


def as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.float().cpu().numpy()
    if isinstance(images, list):  # PIL
        return np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return np.asarray(images, dtype=np.float32)


def assert_drop_in(family, reference, guided, tolerance=1e-5, **kwargs):
    """Without guidance: bitwise the diffusers call. With CFG: diffusers' images within `tolerance`."""
    kwargs = call_kwargs(family, **{"prompt": PROMPT, **kwargs})
    expected = as_array(reference(**kwargs, generator=seeded(), **scale_argument(family)).images)
    plain = as_array(guided(**kwargs, generator=seeded(), **scale_argument(family)).images)
    assert np.array_equal(plain, expected)
    negative = {"negative_prompt": ""} if family == "flux" and "negative_prompt" not in kwargs else {}
    result = guided(**kwargs, **negative, generator=seeded(), guidance=ClassifierFreeGuidance(SCALE))
    assert np.abs(as_array(result.images) - expected).max() <= tolerance
    return result


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture()
def pair(family):
    return build(family, guided=False), build(family)


def test_the_call_signature_is_diffusers_plus_a_keyword_only_guidance(family):
    reference, guided = REFERENCE[family][0], REFERENCE[family][1]
    theirs = inspect.signature(reference.__call__).parameters
    ours = inspect.signature(guided.__call__).parameters
    named = [name for name, p in theirs.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours) == [*named, "guidance", *[name for name in theirs if name not in named]]
    assert all(ours[name].default == theirs[name].default for name in theirs)
    assert ours["guidance"].kind is inspect.Parameter.KEYWORD_ONLY and ours["guidance"].default is None
    assert guided.__call__.__doc__.startswith(reference.__call__.__doc__.rstrip()[:200])
    assert "guidance (`GuidanceScheduler`, *optional*)" in guided.__call__.__doc__


def own_attributes(guided_class, parent):
    """Every attribute the guided class or its mixins define (not the diffusers parent's own)."""
    found = {}
    for klass in guided_class.__mro__:
        if issubclass(parent, klass):
            break
        for name, value in vars(klass).items():
            found.setdefault(name, value)
    return found


def parameter_names(function) -> list[str]:
    function = function.__func__ if isinstance(function, (classmethod, staticmethod)) else function
    return [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]


def test_no_method_shadows_a_diffusers_method_with_other_parameters(family):
    """Failure 2: the sampler's `encode_image(image, height, ...)` hid diffusers' `encode_image(image, device, ...)`,
    which diffusers' IP-Adapter code calls positionally."""
    parent, guided = REFERENCE[family][0], REFERENCE[family][1]
    differing = []
    for name, value in own_attributes(guided, parent).items():
        theirs = inspect.getattr_static(parent, name, None)
        if not callable(value) and not isinstance(value, (classmethod, staticmethod)) or theirs is None:
            continue
        if not callable(theirs) and not isinstance(theirs, (classmethod, staticmethod)):
            continue
        ours, expected = parameter_names(value), parameter_names(theirs)
        if name == "__call__":
            expected = [*expected[: len(expected) - ("kwargs" in expected)], "guidance"] + (
                ["kwargs"] if "kwargs" in expected else []
            )
        if ours != expected:
            differing.append((name, ours, expected))
    assert differing == []
    assert not hasattr(guided, "encode_pixels") and parameter_names(guided.encode_image) == parameter_names(
        parent.encode_image
    )


def test_images_per_prompt(family, pair):
    result = assert_drop_in(family, *pair, num_images_per_prompt=2)
    assert result.trace.batch_size == 2 and result.trace.nfe == 6.0


def test_a_batch_of_prompts_equals_single_calls(family, pair):
    _, guided = pair
    prompts = ["a red circle", "a blue square"]
    kwargs = call_kwargs(family, negative_prompt=["", ""] if family == "flux" else None)
    batch = guided(prompt=prompts, **kwargs, generator=[seeded(0), seeded(1)], guidance=ClassifierFreeGuidance(SCALE))
    for k, prompt in enumerate(prompts):
        single = guided(
            prompt=prompt,
            **call_kwargs(family, negative_prompt="" if family == "flux" else None),
            generator=seeded(k),
            guidance=ClassifierFreeGuidance(SCALE),
        )
        assert np.abs(single.images[0] - batch.images[k]).max() <= 1e-5
    assert_drop_in(family, *pair, prompt=prompts)


def test_every_diffusers_callback_tensor_can_be_read_and_given_back(family, pair):
    reference, guided = pair
    names = list(REFERENCE[family][0]._callback_tensor_inputs)
    seen = {}

    def unchanged(pipe, step, timestep, tensors):
        seen.update({name: tuple(value.shape) for name, value in tensors.items()})
        return tensors

    result = assert_drop_in(
        family, reference, guided, callback_on_step_end=unchanged, callback_on_step_end_tensor_inputs=names
    )
    assert set(seen) == set(names) and seen["latents"][0] == 1
    if family != "flux":  # under CFG diffusers hands over both branches' rows (Flux's true CFG: the prompt's only)
        assert seen["prompt_embeds"][0] == 2
    assert result.trace.num_steps == 3


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_every_output_type_and_return_dict_false(family, pair, output_type):
    reference, guided = pair
    assert_drop_in(family, reference, guided, output_type=output_type)
    tuple_output = guided(
        **call_kwargs(family, prompt=PROMPT, output_type=output_type, return_dict=False),
        generator=seeded(),
        guidance=ClassifierFreeGuidance(SCALE),
    )
    assert isinstance(tuple_output, tuple) and tuple_output[-1].nfe == 6.0


def test_from_pipe_both_ways(family, pair):
    reference, guided = pair
    diffusers_class, guided_class = REFERENCE[family][0], REFERENCE[family][1]
    converted = guided_class.from_pipe(reference)
    back = diffusers_class.from_pipe(guided)
    assert type(converted) is guided_class and type(back) is diffusers_class
    assert denoiser_of(converted) is denoiser_of(reference)  # the same components, not copies
    assert_drop_in(family, back, converted)


def test_save_and_load_round_trip(family, pair, tmp_path):
    """A guided pipeline saves a folder both classes load (diffusers' own round trip moves Flux by 7e-7, so each
    class is compared with the other loaded from the same folder)."""
    _, guided = pair
    guided.save_pretrained(tmp_path / "saved")
    reference, loaded = (cls.from_pretrained(tmp_path / "saved") for cls in REFERENCE[family][:2])
    for pipe in (reference, loaded):
        pipe.set_progress_bar_config(disable=True)
    assert type(loaded) is REFERENCE[family][1]
    assert_drop_in(family, reference, loaded)


def test_attention_slicing_vae_slicing_and_tiling(family, pair):
    reference, guided = pair
    for pipe in pair:
        if hasattr(pipe, "unet"):
            pipe.enable_attention_slicing(1)
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
    assert_drop_in(family, reference, guided, num_images_per_prompt=2)


def test_bfloat16_on_the_cpu(family, pair):
    reference, guided = pair
    for pipe in pair:
        pipe.to(torch.bfloat16)
    result = assert_drop_in(family, reference, guided, tolerance=1e-2)
    assert next(denoiser_of(guided).parameters()).dtype == torch.bfloat16 and result.trace.nfe == 6.0


LORA_LAYERS = {
    "sd": "unet_lora_layers",
    "sdxl": "unet_lora_layers",
    "sd3": "transformer_lora_layers",
    "flux": "transformer_lora_layers",
}


@pytest.fixture()
def lora_folder(family, tmp_path):
    donor = build(family)
    torch.manual_seed(1)
    add_lora(denoiser_of(donor), "style", rank=2, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, parameter in denoiser_of(donor).named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    layers = adapter_state_dict(denoiser_of(donor), "style")
    type(donor).save_lora_weights(tmp_path / "lora", **{LORA_LAYERS[family]: layers})
    return tmp_path / "lora"


def test_lora_load_set_adapters_and_fuse(family, pair, lora_folder):
    reference, guided = pair
    for pipe in pair:
        pipe.load_lora_weights(lora_folder, adapter_name="style")
        pipe.set_adapters(["style"], [0.5])
    assert_drop_in(family, reference, guided)
    attention = "cross_attention_kwargs" if family in ("sd", "sdxl") else "joint_attention_kwargs"
    assert attention in inspect.signature(type(guided).__call__).parameters  # what diffusers' LoRA tests look for
    for pipe in pair:
        pipe.fuse_lora()
    fused = assert_drop_in(family, reference, guided)
    for pipe in pair:
        pipe.unfuse_lora()
        pipe.set_adapters(["style"], [0.0])
    off = assert_drop_in(family, reference, guided)
    assert np.abs(as_array(fused.images) - as_array(off.images)).max() > 1e-4  # the adapter did something


def test_encode_prompt_in_isolation_gives_the_same_images(family, pair):
    """As diffusers' test: the embeddings `encode_prompt` returns, given instead of the prompt, change nothing."""
    reference, guided = pair
    kwargs = call_kwargs(family, prompt=PROMPT, negative_prompt="blue")
    with_prompts = guided(**kwargs, generator=seeded(), guidance=ClassifierFreeGuidance(SCALE)).images
    embeddings = encoded(family, guided, **kwargs)
    given = {k: v for k, v in kwargs.items() if k not in ("prompt", "negative_prompt")}
    from_embeddings = guided(**given, **embeddings, generator=seeded(), guidance=ClassifierFreeGuidance(SCALE))
    assert np.abs(from_embeddings.images - with_prompts).max() <= 1e-5
    assert inspect.signature(type(guided).encode_prompt) == inspect.signature(type(reference).encode_prompt)


def encoded(family, pipe, prompt, negative_prompt, max_sequence_length=None, **_):
    text = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if family == "sd":
        embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, **text)
        negative, negative_pooled, _ = pipe.encode_prompt(negative_prompt, negative_prompt, **text)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    extra = {"prompt_3": prompt, "negative_prompt_3": negative_prompt, **text} if family == "sd3" else {}
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    outputs = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=prompt,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt,
        do_classifier_free_guidance=True,
        **extra,
    )
    return dict(zip(names, outputs, strict=True))


def test_sequential_cpu_offload_where_accelerate_allows_it(family, pair):
    reference, guided = pair
    try:
        reference.enable_sequential_cpu_offload(device="cpu")
        reference(**call_kwargs(family, prompt=PROMPT), **scale_argument(family))
    except (RuntimeError, TypeError, ValueError) as error:
        pytest.skip(
            f"accelerate's sequential offload needs an accelerator: diffusers' own {type(reference).__name__} "
            f"fails without one ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
        )
    guided.enable_sequential_cpu_offload(device="cpu")
    assert_drop_in(family, reference, guided)
