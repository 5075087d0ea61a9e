"""The README's guidance-scheduler example is real code: extract it, run it, check what it claims."""

import re
from pathlib import Path

from conftest import call_kwargs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(marker: str) -> dict:
    """Run the README's python block that contains `marker`; its globals."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = next(block for block in blocks if marker in block)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_readme_scheduler_example_guides_the_first_half(sd_pipe):
    policy = readme_example("class GuideFirstHalf")["GuideFirstHalf"](guidance_scale=6.0)
    result = sd_pipe(**call_kwargs("sd", prompt="a red circle", num_inference_steps=4), guidance=policy)
    assert result.trace.scales == [[6.0], [6.0], [1.0], [1.0]]  # progress 0, 1/3 < 0.5 <= 2/3, 1
    assert result.trace.nfe == 6.0


def test_readme_dynamic_guidance_example_chooses_among_its_candidates():
    example = readme_example("DynamicGuidance(candidates=(5, 7.5, 10, 15)")
    scales = example["out"].trace.scales
    assert len(scales) == 20 and {row[0] for row in scales} <= {5.0, 7.5, 10.0, 15.0}
    assert example["out"].trace.extras[0]["lookahead"] == "next_latent" and example["pixel"].lookahead_kind == "x0"
