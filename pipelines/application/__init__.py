"""The application layer: what the command line, batch runs and the demo add on top of the library.

`models` (model names: diffusers folders and hub ids, `shapes:<sd|sd3>`, `tiny:<family>`), `options` (a method and its
parameters, as a command line, a manifest row or the demo names them, turned into a policy), `manifest` and `batch`
(runs of thousands of prompts into folders that resume), `image_files` (PNGs with their generation record), `demo`
(the demo's logic; `app.py` is its page) and `commands` (the `guided-*` console commands).
"""

from .batch import BatchResult, generate_batch

__all__ = ["BatchResult", "generate_batch"]
