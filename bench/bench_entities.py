"""Benchmark: sampling time with 0, 2, 4, 8 entities against plain sampling of the same model, and
FLUX entity text padded to 512 T5 tokens against its real length.

Every configuration samples the same latent with comfy.sample.sample (Euler, cfg 1, --steps steps);
timings are medians over --repeats after one warm-up, and the summary gives ratios against plain
sampling measured in the same run:
- plain:        the model without EliGen, global prompt only;
- patched_0:    the EliGen-patched model, global prompt only (the patch's idle cost);
- real_N:       N entities, real-length entity text (--entity-tokens tokens each);
- padded_N:     N entities, FLUX only, each padded to 512 T5 tokens (what the released adapter saw);
- unmasked_*:   the largest case's joint sequence on the unpatched model (extra tokens, no mask), which
                separates the cost of the longer sequence from the cost of masked attention.

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_env import setup_comfy  # noqa: E402
COUNTS = (0, 2, 4, 8)
PADDED = 512


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


def time_configs(configs, latent, steps, repeats):
    """Median seconds per configuration; the configurations take turns in every round, so a change of
    machine load affects all of them alike."""
    import torch

    import comfy.sample

    def run(model, positive, negative):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                            disable_pbar=True, seed=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for config in configs.values():
        run(*config)  # warm-up: model load, kernels
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, config in configs.items():
            times[name].append(run(*config))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_family(family, args):
    import torch

    from comfyui_eligen.core import conditioning, patch

    dtype = torch.bfloat16 if args.real_widths else torch.float32
    class_name, config, width, pooled_width, image_px, text_tokens = model_spec(family, args.real_widths, args.blocks)
    model = build_model(class_name, config, dtype)
    patched = patch.patch_model(model)
    generator = torch.Generator().manual_seed(2)
    options = {} if pooled_width is None else {"pooled_output": torch.randn(1, pooled_width, generator=generator)}
    positive = [[torch.randn(1, text_tokens, width, generator=generator).to(dtype), options]]
    negative = [[torch.zeros(1, text_tokens, width, dtype=dtype), dict(options)]]
    latent_shape = (1, 16) + ((1,) if family == "qwen_image" else ()) + (image_px // 8, image_px // 8)
    latent = torch.zeros(latent_shape)

    configs = {"plain": (model, positive, negative), "patched_0": (patched, positive, negative)}
    lengths = {"real": args.entity_tokens}
    if family == "flux":
        lengths["padded"] = PADDED
    sequence = {"plain": text_tokens + (image_px // 16) ** 2}
    sequence["patched_0"] = sequence["plain"]
    for count in COUNTS[1:]:
        for kind, tokens in lengths.items():
            entities = entity_list(count, tokens, width, image_px, dtype)
            configs[f"{kind}_{count}"] = (patched,) + conditioning.apply_entities(positive, entities, negative)
            sequence[f"{kind}_{count}"] = sequence["plain"] + count * tokens
    # The same joint sequence as the largest case, without EliGen's mask (unpatched model: the extra
    # text tokens alone), separates the cost of more tokens from the cost of a masked attention kernel.
    largest = f"{list(lengths)[-1]}_{COUNTS[-1]}"
    configs["unmasked_" + largest] = (model,) + configs[largest][1:]
    sequence["unmasked_" + largest] = sequence[largest]
    seconds = time_configs(configs, latent, args.steps, args.repeats)
    ratios = {name: value / seconds["plain"] for name, value in seconds.items()}
    padded_vs_real = {count: ratios[f"padded_{count}"] / ratios[f"real_{count}"]
                      for count in COUNTS[1:] if f"padded_{count}" in ratios}

    print(f"\n{family}: {class_name} {'real widths' if args.real_widths else 'tiny'} on {args.device}, "
          f"{image_px}x{image_px} px ({(image_px // 16) ** 2} image tokens), global prompt {text_tokens} tokens, "
          f"{args.steps} steps, median of {args.repeats}")
    print(f"{'config':<18}{'joint seq':>10}{'s/run':>10}{'x plain':>9}")
    for name, value in seconds.items():
        print(f"{name:<18}{sequence[name]:>10}{value:>10.3f}{ratios[name]:>9.2f}")
    for count, ratio in padded_vs_real.items():
        print(f"padded/real text with {count} entities: {ratio:.2f}x the time")
    return {"model": class_name, "real_widths": args.real_widths, "image_px": image_px,
            "global_tokens": text_tokens, "entity_tokens_real": args.entity_tokens, "steps": args.steps,
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "ratio_vs_plain": {k: round(v, 3) for k, v in ratios.items()},
            "padded_vs_real": {str(k): round(v, 3) for k, v in padded_vs_real.items()},
            "joint_sequence": sequence}


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
    args = parser.parse_args()
    setup_comfy(args.device)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    families = ["flux", "qwen_image"] if args.family == "both" else [args.family]
    results = {family: bench_family(family, args) for family in families}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"bench": "entities", "device": device_name, "results": results}))


if __name__ == "__main__":
    main()
