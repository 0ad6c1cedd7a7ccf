"""Benchmark: EliGen LoRA training of full-depth FLUX.1 and Qwen-Image in 12 / 16 GB (block swap + fp8).

Per family, each configuration runs in its own child process (its own peak memory and memory cap):

  bf16        bf16 base weights, no limit
  fp8         fp8 e4m3fn base weights (bf16 compute), no limit
  fp8_swap    fp8 base + block swap with the default max_vram_gb (automatic: what the process may use minus
              1 GiB), under a hard cap of the allocator (torch.cuda.set_per_process_memory_fraction): 12 GB
              for FLUX.1, 16 GB for Qwen-Image, as a 12 / 16 GB card

All with gradient checkpointing, bf16 autocast, rank 16, the `eligen` targets, 1024x1024 px, 4 entities.
The models (FLUX.1 19+38 blocks, Qwen-Image 60 blocks) are built with random weights directly on the
GPU (no CPU initialisation). Reported: peak allocated GPU memory during training, median seconds between
optimizer steps (set-up and the first step excluded), the block-swap plan from the trainer's log, and the
ratios against the uncapped fp8 run (aim: fp8_swap at most 1.3x its step time).

If the swap run runs out of memory under the cap (the planner's activation estimate is an estimate), it is
retried with max_vram_gb set 1.5 and 3 GB below the automatic budget; the result says which worked
(max_vram_gb 0 = the default).

    python bench/bench_memory.py --device cuda                  # the real thing (H200: a few minutes)
    python bench/bench_memory.py --device cpu --tiny --steps 3  # the same code at toy size (tests)

Prints one JSON line.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_env import setup_comfy  # noqa: E402

CONFIGS = ["bf16", "fp8", "fp8_swap"]
FAMILIES = ["flux", "qwen_image"]
CAP_GB = {"flux": 12.0, "qwen_image": 16.0}
GB = 2 ** 30  # "12 GB" as on the card (and max_vram_gb): GiB

# family -> (supported_models class name, full config, tiny config, text width, pooled width)
SPECS = {
    "flux": ("Flux",
             {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
              "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "guidance_embed": True},
             {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
              "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
              "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "guidance_embed": True},
             (4096, 768), (32, 32)),
    "qwen_image": ("QwenImage",
                   {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                    "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                    "joint_attention_dim": 3584, "axes_dims_rope": [16, 56, 56]},
                   {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                    "num_layers": 4, "attention_head_dim": 32, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "axes_dims_rope": [8, 12, 12]},
                   (3584, None), (32, None)),
}


# ---------------------------------------------------------------------------------------------------
# Model and data (inside each child)


def init_on_device(module, seed):
    """Random weights made where the parameters live (the GPU): matrices N(0, 1/fan_in), biases 0,
    norm scales 1; generated in bf16 and converted to the parameter's dtype (fp8 included)."""
    import torch

    generators = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            if param.ndim >= 2:
                value = torch.randn(param.shape, generator=generators[param.device], device=param.device,
                                    dtype=torch.bfloat16) * param[0].numel() ** -0.5
            elif name.endswith("bias"):
                value = torch.zeros(param.shape, device=param.device)
            else:
                value = torch.ones(param.shape, device=param.device)
            param.copy_(value.to(param.dtype))


def build(opts, family, fp8):
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    class_name, full, tiny, text, tiny_text = SPECS[family]
    config = getattr(comfy.supported_models, class_name)(dict(tiny if opts.tiny else full))
    # fp8 weights compute in bf16 through ComfyUI's manual cast, as the stock loader sets it up on a GPU
    config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16) if fp8 else config.set_inference_dtype(torch.bfloat16, None)
    device = comfy.model_management.get_torch_device()
    base = config.get_model({}, device=device)
    init_on_device(base.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(base, device, comfy.model_management.unet_offload_device())


def samples(opts, family):
    import torch

    from comfyui_eligen.training.sample import Sample

    _, _, _, (text, pooled), tiny_widths = SPECS[family]
    if opts.tiny:
        text, pooled = tiny_widths
    side = opts.size or (64 if opts.tiny else 1024)
    g = torch.Generator().manual_seed(0)
    latent_shape = (16, side // 8, side // 8) if family == "flux" else (16, 1, side // 8, side // 8)
    masks = torch.zeros(opts.entities, side, side)
    for k in range(opts.entities):  # one quadrant-ish region per entity
        row, col = divmod(k % 4, 2)
        masks[k, row * side // 2:(row + 1) * side // 2, col * side // 2:(col + 1) * side // 2] = 1
    out = []
    for _ in range(opts.images):
        out.append(Sample(
            latent=torch.randn(latent_shape, generator=g),
            context=torch.randn(1, opts.prompt_tokens, text, generator=g),
            pooled=None if pooled is None else torch.randn(1, pooled, generator=g),
            entity_embeds=[torch.randn(1, opts.entity_tokens, text, generator=g) for _ in range(opts.entities)],
            masks=masks.clone(),
        ))
    return out


class PlanLog(logging.Handler):
    """Keeps the trainer's block-swap log line."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if "block swap:" in message:
            self.lines.append(message)


def child(opts):
    import torch

    torch.set_num_threads(opts.threads)
    family, config = opts.family_config.split(":")
    cuda = opts.device == "cuda"
    started = time.perf_counter()
    model = build(opts, family, fp8=config.startswith("fp8"))
    built = time.perf_counter() - started
    data = samples(opts, family)
    swap = config.endswith("_swap")
    cap = opts.cap_gb if opts.cap_gb is not None else CAP_GB[family]
    if cuda:
        torch.cuda.synchronize()
        if swap:
            # Block swap loads the model itself (weights on the CPU, the resident part back on the GPU);
            # start from an empty GPU under the cap.
            model.model.to("cpu")
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total))
        torch.cuda.reset_peak_memory_stats()

    plan = PlanLog()
    root = logging.getLogger()
    level = root.level
    root.addHandler(plan)
    root.setLevel(logging.INFO)
    try:
        run(opts, model, data, family, config, swap, cap, built, plan)
    finally:
        root.removeHandler(plan)
        root.setLevel(level)


def run(opts, model, data, family, config, swap, cap, built, plan):
    import torch

    from comfyui_eligen.training.lora import LoraSettings
    from comfyui_eligen.training.hooks import Hooks
    from comfyui_eligen.training.loop import TrainingData, train
    from comfyui_eligen.training.settings import TrainSettings

    cuda = opts.device == "cuda"
    lora = LoraSettings(rank=opts.rank, alpha=float(opts.rank), preset="eligen")
    # the default (0: automatic, the cap minus 1 GiB), then two lower budgets if it runs out of memory
    budgets = [0.0, cap - 2.5, cap - 4.0] if swap and not opts.tiny else [0.0]
    tries = []
    for budget in budgets:
        stamps = []
        settings = TrainSettings(
            steps=opts.steps, learning_rate=1e-4, batch_size=1, precision="bf16", gradient_checkpointing=True,
            timestep_sampling="uniform", max_vram_gb=budget,
            blocks_to_swap=opts.tiny_swap if swap and opts.tiny else -1)
        try:
            train(model, TrainingData(data), lora, settings, hooks=Hooks(progress=lambda *a: stamps.append(time.perf_counter())))
        except torch.OutOfMemoryError as error:
            tries.append({"max_vram_gb": budget, "error": str(error).splitlines()[0][:200]})
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            continue
        if cuda:
            torch.cuda.synchronize()
        tries.append({"max_vram_gb": settings.max_vram_gb, "ok": True})
        seconds = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else None
        result = {"family": family, "config": config, "seconds_per_step": seconds, "build_seconds": round(built, 1),
                  "peak_gib": torch.cuda.max_memory_allocated() / GB if cuda else None,
                  "cap_gib": cap if swap and cuda else None, "plan": plan.lines[-1:] or None, "tries": tries}
        print("RESULT " + json.dumps(result))
        return
    print("RESULT " + json.dumps({"family": family, "config": config, "error": "out of memory", "tries": tries}))


def meta_model(opts, family, weights):
    """The model of ``family`` (full size, or --tiny) with ``weights`` bf16 or fp8 on the meta device: shapes
    and dtypes only, no memory."""
    import torch

    import comfy.supported_models

    class_name, full, tiny, _, _ = SPECS[family]
    config = getattr(comfy.supported_models, class_name)(dict(tiny if opts.tiny else full))
    if weights == "fp8":
        config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    else:
        config.set_inference_dtype(torch.bfloat16, None)
    return config.get_model({}, device="meta")


def training_plan(opts, family, base, budget):
    """The trainer's own memory plan (training/model.py: ``offload.plan_memory``) for training ``base``
    under ``budget`` (an ``offload.MemoryBudget``) with this benchmark's settings; nothing is computed."""
    import torch

    from comfyui_eligen.core.adapters import adapter_for
    from comfyui_eligen.training import lora, offload

    adapter = adapter_for(base)
    settings = lora.LoraSettings(rank=opts.rank, alpha=float(opts.rank))
    request = offload.MemoryRequest(samples=samples(opts, family), batch_size=1, autocast_dtype=torch.bfloat16)
    return offload.plan_memory(base.diffusion_model, adapter.training_blocks,
                               lora.parameter_count(base.diffusion_model, settings, adapter),
                               lora.DTYPES[settings.dtype], request, budget, torch.bfloat16, checkpointing=True)


def plan_table(opts, budgets=(11, 15, 23)):
    """What ``max_vram_gb`` chooses for each family and base dtype, from the trainer's own estimate: the
    model is built on the meta device (shapes and dtypes only), nothing computed."""
    from comfyui_eligen.training import offload

    table = {}
    for family in (FAMILIES if opts.family == "both" else [opts.family]):
        for weights in ("bf16", "fp8"):
            base = meta_model(opts, family, weights)
            row = {}
            for budget in budgets:
                plan = training_plan(opts, family, base, offload.MemoryBudget(int(budget * GB), f"{budget:g} GiB"))
                row.setdefault("no_limit_gib", round(plan.estimate.device_bytes([]) / GB, 2))
                row[f"{budget:g}GB"] = {"blocks_swapped": f"{plan.count}/{plan.total_blocks}", "fits": plan.fits,
                                      "estimated_gib": round(plan.estimate.device_bytes(plan.positions) / GB, 2),
                                      "streamed_gib_per_pass": round(sum(plan.estimate.block_bytes[i] for i in plan.positions) / GB, 2)}
            table[f"{family} {weights}"] = row
    return table


def parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy depth and width (CPU test of the script)")
    parser.add_argument("--family", choices=FAMILIES + ["both"], default="both")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 1024; tiny 64)")
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--entity-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cap-gb", type=float, default=None, help="memory cap of the swap run (default 12 / 16)")
    parser.add_argument("--tiny-swap", type=int, default=2, help="with --tiny: blocks swapped (no budget on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per child")
    parser.add_argument("--plan-only", action="store_true",
                        help="no training: the trainer's block-swap choice for each of --budgets (meta tensors, CPU)")
    parser.add_argument("--budgets", default="11,15,23",
                        help="max_vram_gb values for --plan-only (default: 12 / 16 / 24 GB cards minus 1 GB)")
    parser.add_argument("--family-config", help=argparse.SUPPRESS)  # internal: run one configuration
    return parser


def main():
    opts = parser().parse_args()
    configs = [c for c in opts.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {CONFIGS}")
    setup_comfy(opts.device)
    if opts.family_config:
        return child(opts)
    if opts.plan_only:
        return print(json.dumps(plan_table(opts, [float(b) for b in opts.budgets.split(",")])))

    families = FAMILIES if opts.family == "both" else [opts.family]
    results = {}
    for family in families:
        results[family] = {}
        for config in configs:
            command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--family-config", f"{family}:{config}"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout)
                output, code = done.stdout, done.returncode
                errors = done.stderr
            except subprocess.TimeoutExpired as expired:
                output, code, errors = (expired.stdout or b"").decode(), "timeout", ""
            line = [l for l in output.splitlines() if l.startswith("RESULT ")]
            if code != 0 or not line:
                results[family][config] = {"error": f"exit {code}: " + " | ".join((errors or output).strip().splitlines()[-3:])}
            else:
                results[family][config] = json.loads(line[0][len("RESULT "):])
            print(f"{family} {config}: {json.dumps(results[family][config])}", file=sys.stderr, flush=True)

    def ratio(family, a, b, key):
        x, y = results[family].get(a, {}).get(key), results[family].get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    summary = {"bench": "memory", "device": opts.device, "tiny": opts.tiny,
               "setup": {"size": opts.size or (64 if opts.tiny else 1024), "entities": opts.entities,
                         "prompt_tokens": opts.prompt_tokens, "entity_tokens": opts.entity_tokens,
                         "rank": opts.rank, "targets": "eligen", "precision": "bf16", "checkpointing": True,
                         "steps": opts.steps},
               "results": results,
               "swap_step_time_vs_fp8": {f: ratio(f, "fp8_swap", "fp8", "seconds_per_step") for f in families},
               "swap_peak_vs_fp8": {f: ratio(f, "fp8_swap", "fp8", "peak_gib") for f in families},
               "fp8_step_time_vs_bf16": {f: ratio(f, "fp8", "bf16", "seconds_per_step") for f in families}}
    summary["aim_met"] = {f: (r is not None and r <= 1.3) for f, r in summary["swap_step_time_vs_fp8"].items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
