"""torch.compile under policies whose batch shrinks (AG's converged rows, LinearAG's synthesised steps): dynamo
compiles the denoiser at most twice in a run (once static, once with a dynamic batch, torch's automatic dynamic
shapes), and never again for other batch sizes. Counted with an eager backend, which recompiles exactly when inductor
would (measured with inductor on the CPU: 2 compilations, about 140 s each for the tiny UNet)."""

import numpy as np
import torch
from conftest import build, call_kwargs, seeded, size_kwargs
from torch._dynamo.testing import CompileCounter

from guidance import AdaptiveGuidance, ClassifierFreeGuidance, UnconditionalSkip
from pipelines.training.linear_ag import calibrate


class Staggered(UnconditionalSkip):
    """Row k stops its unconditional pass at step k: a batch that shrinks by one row a step, like AG's rows as they
    converge one by one."""

    def rows(self, step, needed):
        return (torch.arange(step.batch_size) >= step.step_index) & needed

    def complete(self, step, request, cond, uncond, needed):
        return uncond, request.uncond, {}


def test_a_shrinking_batch_compiles_the_denoiser_at_most_twice():
    torch._dynamo.reset()
    pipe = build("sd")
    plain = pipe(
        **call_kwargs("sd", prompt=["a", "b", "c"], num_inference_steps=6),
        generator=seeded(),
        guidance=AdaptiveGuidance(5.0, threshold=0.9),
    ).images
    counter = CompileCounter()
    pipe.unet = torch.compile(pipe.unet, backend=counter)
    ag = pipe(
        **call_kwargs("sd", prompt=["a", "b", "c"], num_inference_steps=6),
        generator=seeded(),
        guidance=AdaptiveGuidance(5.0, threshold=0.9),
    )
    assert np.abs(ag.images - plain).max() <= 1e-5
    staggered = pipe(
        **call_kwargs("sd", prompt=["a", "b", "c"], num_inference_steps=6),
        guidance=ClassifierFreeGuidance(5.0, skip=Staggered()),
    )
    sizes = [sum(step["uncond"]) + sum(step["cond"]) for step in staggered.trace.branches]
    assert sizes == [6, 5, 4, 3, 3, 3] and counter.frame_count <= 2
    linear, _ = calibrate(pipe, ["a", "b"], 6, 5.0, exact_steps=[0, 1], **size_kwargs("sd"))
    pipe(**call_kwargs("sd", prompt=["a", "b", "c", "d"], num_inference_steps=6), guidance=linear)
    pipe(**call_kwargs("sd", prompt="a", num_inference_steps=6), guidance=ClassifierFreeGuidance(5.0))
    assert counter.frame_count <= 2  # other batch sizes reuse the dynamic graph
    torch._dynamo.reset()
