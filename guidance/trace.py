"""What a guided generation did, step by step: the record the demo plots and the benchmarks count."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GuidanceTrace:
    """Per step and per image: the guidance scale applied and the model branches that ran.

    `scales[i][b]` is the scale applied to image `b` at step `i` (1.0 where the step ran unguided, i.e. with the
    conditional prediction alone). `branches[i][name][b]` tells whether branch `name` ("cond", "uncond",
    "negative") was evaluated for image `b` at step `i`. `extras[i]` holds whatever a method records besides
    (candidate scores, similarities, ...).
    """

    batch_size: int
    scales: list[list[float]] = field(default_factory=list)
    branches: list[dict[str, list[bool]]] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)

    def record(self, scales: torch.Tensor, branches: dict[str, torch.Tensor | list[bool]], **extras) -> None:
        """Append one step: `scales` of shape (batch,), `branches` name -> bool mask of shape (batch,) (a tensor or a
        list)."""
        self.scales.append([float(s) for s in scales.tolist()])
        self.branches.append(
            {
                name: [bool(v) for v in (m.tolist() if isinstance(m, torch.Tensor) else m)]
                for name, m in branches.items()
            }
        )
        self.extras.append(extras)

    @property
    def num_steps(self) -> int:
        return len(self.scales)

    @property
    def nfe(self) -> float:
        """Model evaluations per image, averaged over the batch (constant CFG at 20 steps = 40)."""
        evaluations = sum(sum(mask) for step in self.branches for mask in step.values())
        return evaluations / self.batch_size

    def nfe_per_image(self) -> list[float]:
        """Model evaluations of every image of the batch."""
        return [
            float(sum(mask[row] for step in self.branches for mask in step.values())) for row in range(self.batch_size)
        ]

    def scales_tensor(self) -> torch.Tensor:
        """The applied scales as a (num_steps, batch) tensor."""
        return torch.tensor(self.scales, dtype=torch.float32).reshape(self.num_steps, self.batch_size)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (what the command line writes next to the images)."""
        return {"nfe": self.nfe, "scales": self.scales, "branches": self.branches, "extras": self.extras}
