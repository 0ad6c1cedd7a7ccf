"""Qwen-Image: ComfyUI's ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``.

Text RoPE positions: ComfyUI numbers one prompt's tokens ``offset .. offset+L-1``; the reference gives
every text segment (each entity, then the global prompt) its own positions starting at that same offset.
The ``pe`` tensor ComfyUI computes for the joint sequence already holds rows for positions
``offset .. offset+L_total-1``, so the per-segment ``pe`` is a gather of its text rows.
"""

import torch

from .. import host
from ..blocks import QWEN_IMAGE_TRAINING_BLOCKS
from .base import Adapter

_BLOCK = r"transformer_blocks\.\d+\."
_ATTENTION = r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"


class QwenImageAdapter(Adapter):
    family = "qwen_image"
    display_name = "Qwen-Image"
    reference_schedule = {"kind": "exponential", "mu": 0.8, "terminal": 0.02}
    base_model_class = "QwenImage model"
    diffusion_model_class = "QwenImage diffusion model"
    LORA_TARGETS = {
        # The reference's EliGen targets (eligen.md): attention, MLP down-projections, modulation.
        "eligen": [_BLOCK + r"(" + _ATTENTION + r"|img_mlp\.net\.2|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)"],
        "no_modulation": [_BLOCK + r"(" + _ATTENTION + r"|img_mlp\.net\.0\.proj|img_mlp\.net\.2|txt_mlp\.net\.0\.proj|txt_mlp\.net\.2)"],
        "attention": [_BLOCK + _ATTENTION],
    }
    lora_reference_format = "peft"
    training_blocks = QWEN_IMAGE_TRAINING_BLOCKS

    def training_forward(self, base_model, x_t, sigma, context, pooled, entity_condition, transformer_options,
                         guidance=1.0):
        # The model takes [B, C, T, h, w] (Qwen-Image's VAE is 3-D); accept image latents [B, C, h, w] too.
        if x_t.ndim == 4:
            out = super().training_forward(base_model, x_t[:, :, None], sigma, context, pooled, entity_condition,
                                           transformer_options, guidance)
            return out[:, :, 0]
        return super().training_forward(base_model, x_t, sigma, context, pooled, entity_condition,
                                         transformer_options, guidance)

    def text_position_options(self, diffusion_model, transformer_options, rows, text_length):
        # Each segment from its own first position; padding after a row's text is never seen.
        swap = _SegmentPositions(torch.stack([
            torch.cat([torch.arange(int(n)) for n in row] + [torch.arange(text_length - sum(row))]) for row in rows]))
        count = len(host.models.block_list(diffusion_model, "transformer_blocks"))
        return host.models.with_block_replacements(transformer_options, "double_block", count,
                                                   lambda index, existing: swap.replacement(existing))


class _SegmentPositions:
    """Swaps ``pe`` in every double block; the gathered tensor is computed once per forward pass.
    ``text_rows`` ``[R, T]``: which row of ``pe`` each text position takes (one list for the whole batch,
    or one per batch row)."""

    def __init__(self, text_rows):
        self.text_rows = text_rows
        self._last = (None, None)

    def positions(self, pe):
        if self._last[0] is not pe:
            rows = self.text_rows.to(pe.device)
            # Text rows first, then the image rows unchanged, along pe's sequence axis.
            axis = host.models.rope_sequence_axis(pe)
            text = rows.shape[1]
            image = pe.narrow(axis, text, pe.shape[axis] - text)
            if rows.shape[0] == 1:
                swapped = torch.cat([pe.index_select(axis, rows[0]), image], dim=axis)
            else:  # per batch row (pe holds one row per batch row, or one for all)
                swapped = torch.stack([
                    torch.cat([pe[min(b, pe.shape[0] - 1)].index_select(axis - 1, rows[b]),
                               image[min(b, image.shape[0] - 1)]], dim=axis - 1)
                    for b in range(rows.shape[0])])
            self._last = (pe, swapped)
        return self._last[1]

    def replacement(self, existing):
        def run(args, extra):
            host.models.check_block_args("double_block", args, extra)
            args = dict(args, pe=self.positions(args["pe"]))
            if existing is not None:
                return existing(args, extra)
            return extra["original_block"](args)

        return run
