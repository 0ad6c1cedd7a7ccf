"""The one encoded-example type: what the encoding cache produces and what training and validation use."""

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One encoded training (or validation) example.

    ``latent`` is ``latent_format.process_in``-ed (``[C, h, w]``; ``[C, T, h, w]`` for video-style VAEs);
    ``context`` ``[1, L, D]`` and ``pooled`` ``[1, Dp]`` (or None) are the global prompt; one ``[1, Lk, D]``
    per entity in ``entity_embeds``, each encoded on its own; ``masks`` ``[N, H, W]`` float in {0, 1} at
    the training size in image pixels. ``index`` (position in the dataset), ``prompt`` and
    ``entity_prompts`` are for messages and validation; -1 / empty when unknown.
    """

    latent: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor | None
    entity_embeds: list
    masks: torch.Tensor
    index: int = -1
    prompt: str = ""
    entity_prompts: list = field(default_factory=list)

    @property
    def size(self) -> tuple:
        """The training size (H, W) in image pixels."""
        return tuple(self.masks.shape[-2:])

    def to(self, device=None, dtype=None) -> "Sample":
        """A copy on ``device`` / ``dtype`` (floating tensors; masks stay float) made outside inference
        mode, so autograd may use it. Nodes encode under ``torch.inference_mode``."""
        def move(t):
            return None if t is None else t.detach().to(
                device=device, dtype=dtype if t.is_floating_point() else None).clone()

        with torch.inference_mode(False):
            return Sample(move(self.latent), move(self.context), move(self.pooled),
                          [move(e) for e in self.entity_embeds], move(self.masks).float(), self.index,
                          self.prompt, list(self.entity_prompts))
