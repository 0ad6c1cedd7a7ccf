"""Out-of-place transformer blocks for training, installed through ``patches_replace["dit"]``.

ComfyUI 0.3.75's FLUX blocks update their inputs in place (``img += ...``). Autograd rejects that, and
under ``torch.utils.checkpoint`` the recomputation starts from already-modified tensors, so the
gradients come out silently wrong. The functions here compute the same maths without touching their
inputs. Attention still goes through ComfyUI's FLUX attention with ``transformer_options``
(host.attention.flux_attention), so the EliGen attention override applies exactly as in sampling. Every
part of a ComfyUI block they compute with is read through host.models' block-parts contact points.

Qwen-Image blocks are already out-of-place: their training forward calls the stock block, and a
replacement is installed to add checkpointing.

Composition with replacements that already exist (the EliGen Qwen-Image patch swaps ``pe`` through a
``("double_block", i)`` replacement): the training replacement calls the existing one and hands it the
out-of-place block as its ``original_block``, so both apply, and checkpointing covers both.
"""

import torch
import torch.utils.checkpoint

from . import host


def _rope_for(pe, reference):
    # ComfyUI's FLUX rope is float32; promote it so a float64 model stays float64 end to end (needed
    # for finite-difference checks). For fp32/bf16/fp16 inputs this is the identity.
    if pe is None:
        return None
    return pe.to(torch.promote_types(pe.dtype, reference.dtype))


def _modulate(x, mod):
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


def _split_heads(qkv, num_heads):
    # [B, T, 3*D] -> three [B, H, T, D/H]
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _fp16_clamp(x):
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def flux_double_block(block, img, txt, vec, pe, attn_mask=None, transformer_options={}):
    """FLUX ``DoubleStreamBlock.forward`` (text before image), out of place."""
    parts = host.models.flux_double_block_parts(block)
    if not parts.modulated:
        raise ValueError("EliGen training supports FLUX.1 blocks with per-block modulation only")
    img_mod1, img_mod2 = parts.img_mod(vec)
    txt_mod1, txt_mod2 = parts.txt_mod(vec)

    img_q, img_k, img_v = _split_heads(parts.img_attn.qkv(_modulate(parts.img_norm1(img), img_mod1)), parts.num_heads)
    img_q, img_k = parts.img_attn.norm(img_q, img_k, img_v)
    txt_q, txt_k, txt_v = _split_heads(parts.txt_attn.qkv(_modulate(parts.txt_norm1(txt), txt_mod1)), parts.num_heads)
    txt_q, txt_k = parts.txt_attn.norm(txt_q, txt_k, txt_v)

    if parts.flipped_img_txt:
        order = (img_q, txt_q), (img_k, txt_k), (img_v, txt_v)
    else:
        order = (txt_q, img_q), (txt_k, img_k), (txt_v, img_v)
    q, k, v = (torch.cat(pair, dim=2) for pair in order)
    attn = host.attention.flux_attention(q, k, v, _rope_for(pe, q), attn_mask, transformer_options)
    if parts.flipped_img_txt:
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
    else:
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

    img = img + img_mod1.gate * parts.img_attn.proj(img_attn)
    img = img + img_mod2.gate * parts.img_mlp(_modulate(parts.img_norm2(img), img_mod2))
    txt = txt + txt_mod1.gate * parts.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * parts.txt_mlp(_modulate(parts.txt_norm2(txt), txt_mod2))
    return img, _fp16_clamp(txt)


def flux_single_block(block, x, vec, pe, attn_mask=None, transformer_options={}):
    """FLUX ``SingleStreamBlock.forward``, out of place."""
    parts = host.models.flux_single_block_parts(block)
    if not parts.modulated:
        raise ValueError("EliGen training supports FLUX.1 blocks with per-block modulation only")
    mod, _ = parts.modulation(vec)
    qkv, mlp = torch.split(parts.linear1(_modulate(parts.pre_norm(x), mod)), [3 * parts.hidden_size, parts.mlp_width],
                           dim=-1)
    q, k, v = _split_heads(qkv, parts.num_heads)
    q, k = parts.norm(q, k, v)
    attn = host.attention.flux_attention(q, k, v, _rope_for(pe, q), attn_mask, transformer_options)
    out = parts.linear2(torch.cat((attn, parts.mlp_act(mlp)), 2))
    return _fp16_clamp(x + mod.gate * out)


def _flux_double_replacement(block):
    def run(args):
        host.models.check_block_args("double_block", args)
        img, txt = flux_double_block(
            block, args["img"], args["txt"], args["vec"], args["pe"],
            attn_mask=args.get("attn_mask"), transformer_options=args["transformer_options"],
        )
        return {"img": img, "txt": txt}
    return run


def _flux_single_replacement(block):
    def run(args):
        host.models.check_block_args("single_block", args)
        img = flux_single_block(
            block, args["img"], args["vec"], args["pe"],
            attn_mask=args.get("attn_mask"), transformer_options=args["transformer_options"],
        )
        return {"img": img}
    return run


def _qwen_image_replacement(block):
    # The stock block is out of place; this only binds *this* block. ComfyUI's own ``original_block``
    # closure reads the loop variable ``block`` when called, so a checkpoint recomputation in backward
    # would run the last block instead (silently wrong gradients).
    def run(args):
        host.models.check_block_args("double_block", args)
        txt, img = host.models.qwen_image_block(block, args["img"], args["txt"], args["vec"], args["pe"],
                                         args["transformer_options"])
        return {"img": img, "txt": txt}
    return run


# Per family: replacement kind -> (attribute holding the block list, maker of the training forward of
# one block). Adapters expose these as ``training_blocks``.
FLUX_TRAINING_BLOCKS = {
    "double_block": ("double_blocks", _flux_double_replacement),
    "single_block": ("single_blocks", _flux_single_replacement),
}
QWEN_IMAGE_TRAINING_BLOCKS = {
    "double_block": ("transformer_blocks", _qwen_image_replacement),
}


def _training_replacement(own_forward, existing, checkpointing, wrap=None):
    """One ``patches_replace`` entry: existing replacement (if any) around the out-of-place block,
    optionally under non-reentrant checkpointing. ``wrap`` (block swap) surrounds the block's work and
    forces checkpointing, so a recomputation in backward goes through it again."""

    def run(args, extra):
        if existing is not None:
            def call(a):
                return existing(a, {"original_block": own_forward})
        else:
            call = own_forward
        if wrap is not None:
            call = wrap(call)
        # The model mutates transformer_options (block_index) while it runs; recomputation in
        # backward must see the values of this block, so freeze a copy now.
        args = dict(args, transformer_options=dict(args["transformer_options"]))
        if (checkpointing or wrap is not None) and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(call, args, use_reentrant=False)
        return call(args)

    return run


def training_transformer_options(diffusion_model, training_blocks, transformer_options, checkpointing,
                                 block_wrapper=None):
    """A copy of ``transformer_options`` whose ``patches_replace["dit"]`` runs every block of
    ``diffusion_model`` out of place (and checkpointed when asked), wrapping replacements already there.
    ``block_wrapper(position)`` (position = execution order over ``training_blocks``) may return a
    function wrapper for that block (training/offload.py); such blocks are always checkpointed.
    The input dict is not modified."""
    options = transformer_options
    position = 0
    for kind, (attribute, make_forward) in training_blocks.items():
        block_list = host.models.block_list(diffusion_model, attribute)
        wraps = [block_wrapper(position + i) if block_wrapper is not None else None for i in range(len(block_list))]
        options = host.models.with_block_replacements(
            options, kind, len(block_list),
            lambda index, existing: _training_replacement(make_forward(block_list[index]), existing, checkpointing,
                                                          wraps[index]))
        position += len(block_list)
    return options
