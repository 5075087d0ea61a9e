"""The README's guidance-scheduler example is real code: extract it, run it, check what it claims."""

import re
from pathlib import Path

from conftest import call_kwargs

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(name: str) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    source = next(block for block in blocks if f"class {name}" in block)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_readme_scheduler_example_guides_the_first_half(sd_pipe):
    policy = readme_example("GuideFirstHalf")["GuideFirstHalf"](guidance_scale=6.0)
    result = sd_pipe(**call_kwargs("sd", prompt="a red circle", num_inference_steps=4), guidance=policy)
    assert result.trace.scales == [[6.0], [6.0], [1.0], [1.0]]  # progress 0, 1/3 < 0.5 <= 2/3, 1
    assert result.trace.nfe == 6.0
