"""The image-text models whose text tower scores a latent "clip" head, named by the spec a head saves: an open_clip
model name as a string, or {"type": ..., **arguments} for any `EmbeddingEvaluator` in `TEACHERS`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .clip import ClipEvaluator
from .embedding import EmbeddingEvaluator
from .hpsv2 import HPSv2Evaluator
from .pickscore import PickScoreEvaluator
from .transformers_clip import TransformersClipEvaluator

TEACHERS: dict[str, type[EmbeddingEvaluator]] = {
    "open_clip": ClipEvaluator,
    "transformers-clip": TransformersClipEvaluator,
    "pickscore": PickScoreEvaluator,
    "hpsv2": HPSv2Evaluator,
}
TeacherSpec = str | Mapping[str, Any]


def load_teacher(spec: TeacherSpec) -> EmbeddingEvaluator:
    """The image-text model a spec names (a string: an open_clip model, as `ClipEvaluator` takes it)."""
    if isinstance(spec, str):
        return ClipEvaluator(spec)
    if not isinstance(spec, Mapping) or spec.get("type") not in TEACHERS:
        got = spec.get("type") if isinstance(spec, Mapping) else spec
        raise ValueError(
            f"teacher spec must be an open_clip model name or have a type of {list(TEACHERS)}, got {got!r}"
        )
    arguments = {key: value for key, value in spec.items() if key != "type"}
    return TEACHERS[spec["type"]](**arguments)


def teacher_spec(teacher: EmbeddingEvaluator) -> TeacherSpec:
    """What a head saves to load `teacher` again: an open_clip folder or hub name as a string, else its spec."""
    spec = teacher.spec
    if spec["type"] == "open_clip" and spec["pretrained"] is None:
        return spec["model"]
    return spec


def resolve_teacher(spec: TeacherSpec | None, folder: str | os.PathLike) -> TeacherSpec | None:
    """A saved "local-dir:<relative folder>" (the spec, or any of its values) made absolute from the head's folder,
    so that a head saved beside its teacher loads from anywhere; anything else as it is."""
    if isinstance(spec, Mapping):
        return {
            key: resolve_teacher(value, folder) if isinstance(value, str) else value for key, value in spec.items()
        }
    if spec is None or not spec.startswith("local-dir:") or os.path.isabs(spec.removeprefix("local-dir:")):
        return spec
    return "local-dir:" + os.path.normpath(os.path.join(os.fspath(folder), spec.removeprefix("local-dir:")))
