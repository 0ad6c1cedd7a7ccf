"""One joint attention call with the entity rule, timed per candidate design (used by bench_entities.py).

The methods in core/attention.py (augmented, grouped, dense) run through ComfyUI's chosen attention
function, as in sampling. Two more designs are benchmark-only prototypes, measured to decide whether
they are worth building into the shared sampling/training path (neither is: see docs/design.md):
- split_lse: image queries x (global text + image keys) in one kernel call that also returns the
  log-sum-exp, image queries inside entity k's mask x entity k's text in one call each, merged exactly
  through the log-sum-exps; text queries as in the grouped method. Needs the kernel's LSE, which torch
  only offers through private aten ops (`_scaled_dot_product_flash_attention[_for_cpu]`) and without a
  gradient: inference only, and it bypasses ComfyUI's chosen kernel and other overrides.
- flex: torch's FlexAttention with a block mask built from the rule (CUDA only: compiled kernels).
"""

import statistics
import time

import torch
import torch.nn.functional as F


def _lse_attention(q, k, v):
    """(out, log-sum-exp float32 [B, H, n]) of unmasked attention, from torch's private flash ops."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return out, lse


def split_lse_attention(q, k, v, lengths, token_masks):
    """The entity rule by key segments merged through the log-sum-exp; q, k, v ``[1, H, S, D]``,
    token_masks bool ``[1, N, T]``."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    text, g = starts[-1], starts[-2]
    image_q, image_k, image_v = q[:, :, text:], k[:, :, text:], v[:, :, text:]
    out, lse = _lse_attention(image_q, k[:, :, g:], v[:, :, g:])
    out = out.float()
    texts = []
    for index in range(len(lengths) - 1):
        a, b = starts[index], starts[index + 1]
        inside = token_masks[0, index].nonzero().squeeze(1)
        keys = torch.cat([k[:, :, a:b], image_k.index_select(2, inside)], dim=2)
        values = torch.cat([v[:, :, a:b], image_v.index_select(2, inside)], dim=2)
        texts.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values))
        if len(inside):
            part, part_lse = _lse_attention(image_q.index_select(2, inside), k[:, :, a:b], v[:, :, a:b])
            old_lse = lse.index_select(2, inside)
            new_lse = torch.logaddexp(old_lse, part_lse)
            merged = (out.index_select(2, inside) * (old_lse - new_lse).exp()[..., None]
                      + part.float() * (part_lse - new_lse).exp()[..., None])
            out = out.index_copy(2, inside, merged)
            lse = lse.index_copy(2, inside, new_lse)
    texts.append(F.scaled_dot_product_attention(q[:, :, g:text], k[:, :, g:], v[:, :, g:]))
    return torch.cat(texts + [out.to(q.dtype)], dim=2)


def flex_attention_call(lengths, token_masks, sequence, device):
    """A compiled FlexAttention call with the rule's block mask, or None where FlexAttention can't run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    entities = len(lengths) - 1
    segment = torch.full((sequence,), -1, dtype=torch.int64, device=device)
    bits = torch.zeros(sequence, dtype=torch.int64, device=device)
    start = 0
    for index, n in enumerate(lengths):
        segment[start:start + n] = index
        start += n
    weights = 2 ** torch.arange(entities, device=device, dtype=torch.int64)
    bits[start:] = (token_masks[0].long() * weights[:, None]).sum(0)

    def rule(b, h, q_index, kv_index):
        sq, sk = segment[q_index], segment[kv_index]
        image_q, image_k = sq < 0, sk < 0
        text_to_image = (sq == entities) | ((bits[kv_index] >> sq.clamp(min=0)) & 1 == 1)
        image_to_text = (sk == entities) | ((bits[q_index] >> sk.clamp(min=0)) & 1 == 1)
        return ((image_q & image_k) | (~image_q & ~image_k & (sq == sk))
                | (~image_q & image_k & text_to_image) | (image_q & ~image_k & image_to_text))

    block_mask = create_block_mask(rule, None, None, sequence, sequence, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def median_ms(calls, repeats, synchronize, cuda):
    """Median ms per named call, the calls taking turns in every round, after one warm-up each. CPU time
    of the process on the CPU (a busy machine's other processes don't count), wall time with CUDA."""
    clock = time.perf_counter if cuda else time.process_time
    times = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, run in calls.items():
            start = clock()
            run()
            synchronize()
            if round_:
                times[name].append(clock() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def candidate_times(device, heads, dim, image_tokens, lengths, token_masks, dtype, repeats, func, with_flex):
    """ms per joint attention call for every candidate, and each one's max abs difference to dense."""
    from comfyui_eligen.core import attention

    sequence = sum(lengths) + image_tokens
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, heads, sequence, dim, generator=generator).to(device, dtype) for _ in range(3))
    cuda = str(device).startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    calls = {"plain": lambda: func(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)}
    for method in (attention.AUTO, attention.AUGMENTED, attention.GROUPED, attention.DENSE):
        entity = attention.EntityAttention(lengths, token_masks, method)
        options = {attention.OPTIONS_KEY: entity, "optimized_attention_override": attention.entity_attention_override()}
        calls[method] = (lambda options=options: func(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                                                      transformer_options=options))
    calls["split_lse"] = lambda: split_lse_attention(q, k, v, lengths, token_masks)
    if with_flex:
        try:
            flex = flex_attention_call(lengths, token_masks, sequence, q.device)
            if flex is not None:
                flex(q, k, v)
                calls["flex"] = lambda: flex(q, k, v)
        except Exception as error:  # report, don't stop the benchmark
            print(f"flex attention unavailable here: {type(error).__name__}: {error}")
    with torch.no_grad():
        reference = calls[attention.DENSE]().float()
        ms = median_ms(calls, repeats, synchronize, cuda)
        result = {}
        for name, run in calls.items():
            difference = None if name == "plain" else (run().float() - reference).abs().max().item()
            result[name] = {"ms": round(ms[name], 3), "max_abs_diff_vs_dense": difference}
    plain = result["plain"]["ms"]
    for entry in result.values():
        entry["x_plain"] = round(entry["ms"] / plain, 3)
    return result
