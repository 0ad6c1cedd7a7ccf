"""Benchmark: the cost of EliGen's entity attention, as ratios against plain sampling of the same model
measured in the same run, for every attention method side by side (core/attention.py: augmented, grouped,
and the dense S x S mask that EliGen used before), plus a training step and the peak attention memory.

Sampling: every configuration samples the same latent with comfy.sample.sample (Euler, cfg 1, --steps
steps); timings are medians over --repeats after one warm-up, the configurations taking turns:
- plain:             the model without EliGen, global prompt only;
- patched_0:         the EliGen-patched model, global prompt only (the patch's idle cost);
- <method>:real_N:   N entities, real-length entity text (--entity-tokens tokens each);
- <method>:padded_N: N entities, FLUX only, each padded to 512 T5 tokens (what the released adapter saw);
- unmasked_*:        the largest case's joint sequence on the unpatched model (extra tokens, no rule),
                     the floor that the extra text tokens alone set.
Training (--train-counts): one forward + backward of the diffusion model (to the latent, as a LoRA step
minus the LoRA's own small gradients), without entities and with N real-length entities per method.
Memory: one joint attention call with 8 FLUX entities padded to 512 tokens (the largest case), per method:
on CUDA torch.cuda.max_memory_allocated above the inputs; on the CPU the peak bytes held by tensors the call
creates (a dispatch-mode count), at --memory-px, plus the analytic figure at 1024 px FLUX widths.

Models: by default tiny ones on the CPU (FLUX: hidden 128, 2 heads, 2+2 blocks; Qwen-Image: 2 heads x 64,
3 blocks) at 192x192 px. `--device cuda --real-widths` builds FLUX.1's real block width (hidden 3072, 24
heads, T5 width 4096) and Qwen-Image's (24 heads x 128, text width 3584) with --blocks blocks and random
weights in bf16, at 1024x1024 px (4096 image tokens) with a 512-token FLUX prompt.

    .venv/bin/python bench/bench_entities.py [--family flux|qwen_image|both] [--device cuda --real-widths]

Prints a table per family and one JSON line (the last line).
"""

import argparse
import json
import os
import statistics
import sys
import time
import weakref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_env import setup_comfy  # noqa: E402
COUNTS = (0, 2, 4, 8)
PADDED = 512
METHODS = ("auto", "augmented", "grouped", "dense")  # auto (the default) picks augmented or grouped


def model_spec(family, real_widths, blocks):
    """(supported_models class name, unet_config, text width, pooled width, image px, global text tokens)."""
    if family == "flux":
        if real_widths:
            config = {"hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56], "context_in_dim": 4096,
                      "vec_in_dim": 768, "depth": blocks, "depth_single_blocks": 2 * blocks, "mlp_ratio": 4.0,
                      "guidance_embed": True}
            size, text = 1024, 512
        else:
            config = {"hidden_size": 128, "num_heads": 2, "axes_dim": [16, 24, 24], "context_in_dim": 64,
                      "vec_in_dim": 64, "depth": 2, "depth_single_blocks": 2, "mlp_ratio": 4.0,
                      "guidance_embed": False}
            size, text = 192, 32
        config.update({"image_model": "flux", "in_channels": 16, "out_channels": 16, "theta": 10000,
                       "patch_size": 2, "qkv_bias": True})
        return "Flux", config, config["context_in_dim"], config["vec_in_dim"], size, text
    if real_widths:
        config = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 3584,
                  "num_layers": blocks, "axes_dims_rope": [16, 56, 56]}
        size, text = 1024, 64
    else:
        config = {"num_attention_heads": 2, "attention_head_dim": 64, "joint_attention_dim": 64, "num_layers": 3,
                  "axes_dims_rope": [16, 24, 24]}
        size, text = 192, 16
    config.update({"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16})
    return "QwenImage", config, config["joint_attention_dim"], None, size, text


def build_model(class_name, config, dtype, seed=0):
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    device = comfy.model_management.get_torch_device()
    model_config = getattr(comfy.supported_models, class_name)(config)
    model_config.set_inference_dtype(dtype, None)
    base_model = model_config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in base_model.diffusion_model.parameters():
            scale = param[0].numel() ** -0.5 if param.ndim >= 2 else 0.02
            param.copy_(torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32) * scale)
    return comfy.model_patcher.ModelPatcher(base_model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def entity_list(count, tokens, width, image_px, dtype, seed=1):
    import torch

    from comfyui_eligen.core.conditioning import Entity

    generator = torch.Generator().manual_seed(seed)
    entities = []
    for i in range(count):
        mask = torch.zeros(image_px, image_px)
        top, left = (int(v) for v in torch.randint(0, image_px // 2, (2,), generator=generator))
        mask[top:top + image_px // 3, left:left + image_px // 3] = 1.0
        entities.append(Entity(torch.randn(1, tokens, width, generator=generator).to(dtype), mask, f"entity {i}"))
    return tuple(entities)


def median_seconds(runs, repeats):
    """Median seconds per named callable; they take turns in every round, so a change of machine load
    affects all of them alike. One warm-up run each (model load, kernels, cached masks). Seconds are the
    process's CPU time on the CPU (one torch thread: other processes on a busy machine don't count) and
    wall time with CUDA."""
    import torch

    clock = time.perf_counter if torch.cuda.is_available() else time.process_time

    def timed(run):
        start = clock()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return clock() - start

    for run in runs.values():
        timed(run)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    return {name: statistics.median(values) for name, values in times.items()}


def sampling_run(model, positive, negative, latent, steps):
    import torch

    import comfy.sample

    def run():
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                            disable_pbar=True, seed=0)
    return run


def training_run(model, latent, context, pooled, condition, dtype):
    """One forward + backward of the diffusion model through the EliGen wrapper, as training runs it."""
    import torch

    from comfyui_eligen.core import blocks, host
    from comfyui_eligen.core.adapters import adapter_for

    adapter = adapter_for(model)
    options = host.models.sampling_transformer_options(model)
    # The trainer's out-of-place blocks (ComfyUI's FLUX blocks update in place), no checkpointing.
    options = blocks.training_transformer_options(model.model.diffusion_model, adapter.training_blocks, options, False)
    device = model.load_device

    def run():
        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
        x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        x.requires_grad_(True)
        sigma = torch.full((latent.shape[0],), 0.6, device=device)
        with torch.inference_mode(False), torch.enable_grad():
            out = adapter.training_forward(model.model, x, sigma, context.to(device, dtype),
                                           None if pooled is None else pooled.to(device, dtype), condition, options)
            out.float().square().mean().backward()
    return run


class PeakAllocations:
    """Peak bytes held by tensors created inside the ``with`` block (CPU or any device): every op's
    outputs are counted by storage until the last tensor using that storage is freed."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live = self.peak = 0
        self.users = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_leaves(out):
                    if hasattr(tensor, "untyped_storage"):
                        tracker._track(tensor)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.users:
            self.users[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.users[key][0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self.users.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.users[key]

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def attention_memory(args, methods):
    """Peak memory of one joint attention call with 8 FLUX entities padded to 512 tokens, per method
    (the EntityAttention is built inside the measurement: the dense mask is part of the cost)."""
    import torch

    import comfy.ldm.modules.attention
    from comfyui_eligen.core import attention

    real = args.device.startswith("cuda")
    heads, dim = (24, 128) if real else (2, 64)
    px = 1024 if real else args.memory_px
    entities, padded, global_tokens = 8, PADDED if real else 64, 512 if real else 32
    dtype = torch.bfloat16 if real else torch.float32
    side = px // 16
    image_tokens = side * side
    lengths = [padded] * entities + [global_tokens]
    sequence = sum(lengths) + image_tokens
    generator = torch.Generator().manual_seed(3)
    token_masks = rule_token_masks(entities, side, args.device)
    q, k, v = (torch.randn(1, heads, sequence, dim, generator=generator).to(args.device, dtype) for _ in range(3))
    func = comfy.ldm.modules.attention.optimized_attention
    result = {"sequence": sequence, "heads": heads, "head_dim": dim, "image_px": px, "dtype": str(dtype),
              "kernel": func.__name__, "peak_mb": {}}
    for method in ("plain",) + tuple(methods):
        def call():
            if method == "plain":
                return func(q, k, v, heads, skip_reshape=True)
            entity = attention.EntityAttention(lengths, token_masks, method)
            options = {attention.OPTIONS_KEY: entity, "optimized_attention_override": attention.entity_attention_override()}
            return func(q, k, v, heads, skip_reshape=True, transformer_options=options)

        with torch.no_grad():
            if real:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                out = call()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                with PeakAllocations() as tracker:
                    out = call()
                peak = tracker.peak
            del out
        result["peak_mb"][method] = round(peak / 2 ** 20, 1)
    result["analytic_1024px_mb"] = analytic_memory()
    return result


def rule_token_masks(entities, side, device, seed=3):
    """Boxes of a third of the image side at random places: ``[1, N, side*side]`` bool."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    grid = torch.zeros(1, entities, side, side, dtype=torch.bool)
    for k in range(entities):
        top, left = (int(v) for v in torch.randint(0, side // 2, (2,), generator=generator))
        grid[0, k, top:top + side // 3, left:left + side // 3] = True
    return grid.flatten(2).to(device)


def attention_candidates(args):
    """ms per joint attention call for every candidate design (bench/attention_candidates.py), FLUX
    widths at 1024 px on CUDA (24 heads x 128, bf16), 2 heads x 64 float32 at --memory-px on the CPU."""
    import torch

    import comfy.ldm.modules.attention
    from attention_candidates import candidate_times

    real = args.device.startswith("cuda")
    heads, dim = (24, 128) if real else (2, 64)
    px = 1024 if real else args.memory_px
    dtype = torch.bfloat16 if real else torch.float32
    side = px // 16
    func = comfy.ldm.modules.attention.optimized_attention
    print()
    results = {}
    for count in args.counts:
        for kind, tokens in (("real", args.entity_tokens), ("padded", PADDED if real else 64)):
            lengths = [tokens] * count + [512 if real else 32]
            masks = rule_token_masks(count, side, args.device)
            # FlexAttention compiles per shape: only for the largest count, to bound the run time.
            result = candidate_times(args.device, heads, dim, side * side, lengths, masks, dtype, args.repeats,
                                     func, with_flex=real and count == args.counts[-1])
            results[f"{kind}_{count}"] = result
            print(f"attention call, FLUX {kind}_{count} (S={sum(lengths) + side * side}, {heads}x{dim}, {dtype}, "
                  f"{func.__name__}): " + ", ".join(f"{name} {entry['ms']:.2f} ms ({entry['x_plain']:.2f}x"
                                                     + (f", diff {entry['max_abs_diff_vs_dense']:.1e}" if entry['max_abs_diff_vs_dense'] is not None else "")
                                                     + ")" for name, entry in result.items()))
    return results


def report_memory(args):
    memory = attention_memory(args, args.methods)
    print(f"\nattention memory, one call, 8 FLUX entities x {PADDED if args.device.startswith('cuda') else 64} "
          f"tokens at {memory['image_px']} px (S={memory['sequence']}, {memory['heads']} heads x "
          f"{memory['head_dim']}, {memory['dtype']}, kernel {memory['kernel']}): peak MiB {memory['peak_mb']}")
    print(f"analytic, FLUX 1024 px, 8 entities x {PADDED} (S={memory['analytic_1024px_mb']['sequence']}): "
          f"MiB added per call {memory['analytic_1024px_mb']}")
    return memory


def analytic_memory(heads=24, dim=128, image_tokens=4096, entities=8, padded=PADDED, global_tokens=512, dtype_bytes=2):
    """MiB that each method adds to one FLUX attention call at 1024 px with 8 padded entities, besides the
    kernel's own working memory and the [B, H, S, D] output every method returns."""
    sequence = entities * padded + global_tokens + image_tokens
    dense = sequence ** 2 * (1 + dtype_bytes)  # the cached bool rule and the additive mask [1, 1, S, S]
    extra = 2 * entities + 1
    wide = dim + extra + (-(dim + extra)) % 8
    augmented = 3 * heads * sequence * wide * dtype_bytes  # widened q, k, v
    # grouped, at its largest moment: one group's gathered keys and values (up to all keys), its queries.
    grouped = (2 * heads * sequence * dim + heads * image_tokens * dim) * dtype_bytes
    return {"sequence": sequence, "dense": round(dense / 2 ** 20, 1), "augmented": round(augmented / 2 ** 20, 1),
            "grouped": round(grouped / 2 ** 20, 1)}


def bench_family(family, args):
    import torch

    from comfyui_eligen.core import conditioning, patch

    dtype = torch.bfloat16 if args.real_widths else torch.float32
    class_name, config, width, pooled_width, image_px, text_tokens = model_spec(family, args.real_widths, args.blocks)
    model = build_model(class_name, config, dtype)
    patched = {method: patch.patch_model(model, attention=method) for method in args.methods}
    generator = torch.Generator().manual_seed(2)
    options = {} if pooled_width is None else {"pooled_output": torch.randn(1, pooled_width, generator=generator)}
    positive = [[torch.randn(1, text_tokens, width, generator=generator).to(dtype), options]]
    negative = [[torch.zeros(1, text_tokens, width, dtype=dtype), dict(options)]]
    latent_shape = (1, 16) + ((1,) if family == "qwen_image" else ()) + (image_px // 8, image_px // 8)
    latent = torch.zeros(latent_shape)

    first = args.methods[0]
    configs = {"plain": (model, positive, negative), "patched_0": (patched[first], positive, negative)}
    lengths = {"real": args.entity_tokens}
    if family == "flux" and not args.no_padded:
        lengths["padded"] = PADDED
    sequence = {"plain": text_tokens + (image_px // 16) ** 2}
    sequence["patched_0"] = sequence["plain"]
    for count in args.counts:
        for kind, tokens in lengths.items():
            applied = conditioning.apply_entities(positive, entity_list(count, tokens, width, image_px, dtype), negative)
            for method in args.methods:
                configs[f"{method}:{kind}_{count}"] = (patched[method],) + applied
                sequence[f"{method}:{kind}_{count}"] = sequence["plain"] + count * tokens
    # The same joint sequence as the largest case on the unpatched model: the extra text tokens alone.
    largest = f"{list(lengths)[-1]}_{args.counts[-1]}"
    configs["unmasked_" + largest] = (model,) + configs[f"{first}:{largest}"][1:]
    sequence["unmasked_" + largest] = sequence[f"{first}:{largest}"]
    runs = {name: sampling_run(*config, latent, args.steps) for name, config in configs.items()}
    seconds = median_seconds(runs, args.repeats)
    ratios = {name: value / seconds["plain"] for name, value in seconds.items()}

    print(f"\n{family}: {class_name} {'real widths' if args.real_widths else 'tiny'} on {args.device}, "
          f"{image_px}x{image_px} px ({(image_px // 16) ** 2} image tokens), global prompt {text_tokens} tokens, "
          f"{args.steps} steps, median of {args.repeats}")
    print(f"{'config':<22}{'joint seq':>10}{'s/run':>10}{'x plain':>9}")
    for name, value in seconds.items():
        print(f"{name:<22}{sequence[name]:>10}{value:>10.3f}{ratios[name]:>9.2f}")
    result = {"model": class_name, "real_widths": args.real_widths, "image_px": image_px,
              "global_tokens": text_tokens, "entity_tokens_real": args.entity_tokens, "steps": args.steps,
              "seconds": {k: round(v, 4) for k, v in seconds.items()},
              "ratio_vs_plain": {k: round(v, 3) for k, v in ratios.items()},
              "joint_sequence": sequence}

    if args.train_counts:
        try:
            result.update(bench_training_step(args, model, patched, positive, options, latent, width, image_px,
                                              text_tokens, dtype))
        except Exception as error:  # keep the sampling figures and the later parts of a GPU run
            print(f"training step failed: {type(error).__name__}: {error}")
            result["training_error"] = f"{type(error).__name__}: {error}"
    return result


def bench_training_step(args, model, patched, positive, options, latent, width, image_px, text_tokens, dtype):
    """Seconds of one forward + backward without entities and with N real-length entities per method."""
    import torch

    from comfyui_eligen.core import conditioning

    first = args.methods[0]
    result = {}
    context = positive[0][0].to(model.load_device)
    pooled = options.get("pooled_output")
    train = {"train_plain": training_run(patched[first], latent, context, pooled, None, dtype)}
    for count in args.train_counts:
        entities = entity_list(count, args.entity_tokens, width, image_px, dtype)
        embeds = torch.cat([e.embeds for e in entities] + [positive[0][0]], dim=1)
        condition = conditioning.EntityCondition.for_training(
            [e.embeds.shape[1] for e in entities] + [text_tokens], conditioning.stack_masks(entities)[0][None])
        for method in args.methods:
            train[f"train_{method}:real_{count}"] = training_run(patched[method], latent, embeds, pooled, condition, dtype)
    train_seconds = median_seconds(train, args.repeats)
    print(f"{'training step':<22}{'':>10}{'s/step':>10}{'x plain':>9}")
    for name, value in train_seconds.items():
        print(f"{name:<22}{'':>10}{value:>10.3f}{value / train_seconds['train_plain']:>9.2f}")
    result["training_seconds"] = {k: round(v, 4) for k, v in train_seconds.items()}
    result["training_ratio_vs_plain"] = {k: round(v / train_seconds["train_plain"], 3) for k, v in train_seconds.items()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["flux", "qwen_image", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--real-widths", action="store_true", help="real FLUX.1 / Qwen-Image block widths (GPU)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks with --real-widths (FLUX: N double + 2N single)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steady on a busy machine)")
    parser.add_argument("--entity-tokens", type=int, default=8, help="real length of each entity prompt")
    parser.add_argument("--methods", default=",".join(METHODS), help="attention methods to compare, comma-separated")
    parser.add_argument("--counts", default="2,4,8", help="entity counts for sampling, comma-separated")
    parser.add_argument("--no-padded", action="store_true", help="skip the FLUX entities padded to 512 tokens")
    parser.add_argument("--train-counts", default="2,8", help="entity counts for the training step ('' skips it)")
    parser.add_argument("--memory-px", type=int, default=256, help="image size of the CPU memory measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the attention memory measurement")
    parser.add_argument("--no-candidates", action="store_true", help="skip timing one attention call per design")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    args.train_counts = [int(c) for c in args.train_counts.split(",") if c.strip()]
    setup_comfy(args.device)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    families = ["flux", "qwen_image"] if args.family == "both" else [args.family]
    results = {family: bench_family(family, args) for family in families}
    for name, skip, part in (("attention_memory", args.no_memory, report_memory),
                             ("attention_call", args.no_candidates, attention_candidates)):
        if skip:
            continue
        try:  # one failing part must not cost the others on a GPU run
            results[name] = part(args)
        except Exception as error:
            print(f"{name} failed: {type(error).__name__}: {error}")
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"bench": "entities", "device": device_name, "methods": args.methods, "results": results}))


if __name__ == "__main__":
    main()
