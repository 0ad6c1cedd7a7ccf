"""One model, two implementations: ComfyUI (with this package) and DiffSynth-Studio's EliGen (the reference),
on the same random weights at the real widths and head counts, reduced depth.

How the weights get into both (a ``Pair``):
1. A seeded random checkpoint in the layout a user's file has (FLUX.1: the original BFL names; Qwen-Image:
   the diffusers names), stored in bfloat16 as the released checkpoints are.
2. ComfyUI loads it through ``comfy.sd.load_diffusion_model_state_dict`` (what the stock diffusion-model
   loader calls), in float32; its own detection finds the family, widths and the reduced depth. The loaded
   tensors are checked against the checkpoint's (``comfy_load``).
3. The reference's DiT is built by the reference's own ``load_model`` with its own state-dict converter,
   from a state dict holding ComfyUI's loaded tensors (the checkpoint's names and values, step 2), assigned
   without a copy: both models share one copy of the weights. Nothing here writes into those weights: LoRA
   in ComfyUI replaces parameters (and is unloaded after use), peft wraps modules; the one writer, the
   reference's LoRA fusing, runs last and marks the pair ``spoiled`` so that a later user reloads it.

Comparisons are in float32 on the CPU. A difference is reported as (max absolute, max relative), the
relative one being the max absolute difference over the largest magnitude of the reference's tensor.
"""

import contextlib
import gc
import math
import os
from concurrent.futures import ThreadPoolExecutor

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import numpy as np
import pytest
import torch
from comfyui_eligen.core import blocks, conditioning, lora_formats, patch
from comfyui_eligen.core.adapters import adapter_for
from comfyui_eligen.nodes.entities import EliGenApply, EliGenEntity
from comfyui_eligen.training import lora, loss
from diffsynth_reference import reference
from PIL import Image

# Max relative difference allowed in float32 (the aim), and what a comparison that matters must
# exceed (the divergence checks).
TOLERANCE = 1e-4
MATTERS = 10 * TOLERANCE

# (family, case, max abs, max rel) of every comparison made, for the report (printed by ``print_figures``).
FIGURES = []


def difference(ours, theirs):
    """(max absolute difference, that over the largest magnitude of ``theirs``)."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    if ours.shape != theirs.shape:
        raise AssertionError(f"shapes differ: ours {tuple(ours.shape)}, the reference's {tuple(theirs.shape)}")
    largest = theirs.abs().max().item()
    absolute = (ours - theirs).abs().max().item()
    if largest == 0:
        return absolute, 0.0 if absolute == 0 else math.inf
    return absolute, absolute / largest


def assert_same(family, case, ours, theirs, tolerance=TOLERANCE):
    """Record the difference and fail when its relative size exceeds ``tolerance`` or is not finite."""
    absolute, relative = difference(ours, theirs)
    FIGURES.append((family, case, absolute, relative))
    assert math.isfinite(relative) and relative <= tolerance, (
        f"{family} {case}: max abs difference {absolute:.3e}, max rel {relative:.3e} > {tolerance:.0e}")
    return relative


def assert_gradients_same(family, ours, theirs, tolerance=TOLERANCE):
    """LoRA gradients by name, equal on both sides: all of them as one vector within ``tolerance`` (as a
    model output), and each tensor on its own (relative to its own largest entry, which for the smallest
    gradients is float32 rounding of a sum of large terms) within ``10 * tolerance``, so that a wrong or
    missing single tensor fails too. A LoRA the loss does not reach (a last block's text-only layers) has no
    gradient: on both sides alike."""
    assert sorted(ours) == sorted(theirs), (family, sorted(set(ours) ^ set(theirs))[:5])
    unreached = sorted(k for k, g in ours.items() if g is None or not bool(g.any()))
    assert unreached == sorted(k for k, g in theirs.items() if g is None or not bool(g.any())), unreached
    assert len(unreached) < len(ours) / 2, unreached
    keys = [k for k in sorted(ours) if k not in unreached]
    reached = f"{len(keys)} of {len(ours)} tensors"
    assert_same(family, f"LoRA gradients ({reached}, as one vector)", torch.cat([ours[k].flatten() for k in keys]),
                torch.cat([theirs[k].flatten() for k in keys]), tolerance)
    (absolute, relative), key = max(((difference(ours[k], theirs[k]), k) for k in keys), key=lambda item: item[0][1])
    FIGURES.append((family, f"LoRA gradients, worst single tensor ({key})", absolute, relative))
    assert relative <= 10 * tolerance, f"{family} LoRA gradient {key}: max abs {absolute:.3e}, max rel {relative:.3e}"


def print_figures(family):
    rows = [row for row in FIGURES if row[0] == family]
    if rows:
        width = max(len(row[1]) for row in rows)
        print(f"\n{family}: case | max abs difference | max rel difference")
        for _, case, absolute, relative in rows:
            print(f"  {case:<{width}} | {absolute:.2e} | {relative:.2e}")


# ---------------------------------------------------------------------------------------------------
# Weights

def _uniform_bfloat16(shape, generator):
    """i.i.d. uniform values in [-0.5, 0.5) on a 1/128 grid, as bfloat16, from random bits (fast)."""
    count = math.prod(shape)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((count + 3) // 4,), dtype=torch.int64, generator=generator)
    bits = words.view(torch.int16)[:count]
    bits.bitwise_and_(0x7F).bitwise_or_(0x3F80)  # exponent of 1.0, random 7-bit mantissa: [1, 2)
    return bits.view(torch.bfloat16).sub_(1.5).view(shape)


def _random_tensor(key, shape, seed):
    values = _uniform_bfloat16(tuple(shape), torch.Generator().manual_seed(seed))
    if len(shape) >= 2:
        return values.mul_(2 * math.sqrt(3 / math.prod(shape[1:])))
    if key.endswith("bias"):
        return values.mul_(0.04)
    return values.mul_(0.2).add_(1.0)


def random_checkpoint(shapes, seed):
    """``{key: bfloat16 tensor}``: matrices with unit-variance outputs (uniform, std 1/sqrt(fan in)), biases
    near 0, norm scales near 1. Every tensor has its own generator (seed, position), so nothing repeats;
    they are drawn on all cores."""
    jobs = [(key, shape, seed * 100003 + index) for index, (key, shape) in enumerate(shapes.items())]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(zip(shapes, pool.map(lambda job: _random_tensor(*job), jobs)))


def comfy_load(checkpoint):
    """The checkpoint through ComfyUI's loader (float32), checked against the checkpoint key by key: the
    same names and shapes, float32, and equal values at every 61st position of every tensor (a tensor
    moved, transposed or permuted would differ there)."""
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(checkpoint), model_options={"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not recognise the checkpoint"
    loaded = patcher.model.diffusion_model.state_dict()
    assert sorted(loaded) == sorted(checkpoint), sorted(set(loaded) ^ set(checkpoint))[:8]
    for key, tensor in checkpoint.items():
        ours = loaded[key]
        assert ours.dtype == torch.float32 and ours.shape == tensor.shape, key
        assert torch.equal(ours.flatten()[::61], tensor.flatten()[::61].float()), key
    return patcher


class Pair:
    """ComfyUI's ModelPatcher (``comfy``) and the reference's DiT (``reference``) on the same weights (see the
    module docstring): ``shapes`` is the checkpoint layout, ``build_reference(state_dict, **options)`` makes
    the reference's DiT from a state dict in that layout."""

    def __init__(self, shapes, build_reference, seed=0):
        self.shapes = shapes
        self.build_reference = build_reference
        self.seed = seed
        self.spoiled = False
        self.comfy = None
        self.load()

    def load(self):
        self.comfy = None
        gc.collect()
        checkpoint = random_checkpoint(self.shapes, self.seed)
        self.comfy = comfy_load(checkpoint)
        del checkpoint
        gc.collect()
        self.spoiled = False
        self._reference = self.reference_dit()

    @property
    def diffusion_model(self):
        return self.comfy.model.diffusion_model

    def reference_dit(self, **options):
        """A new reference DiT on ComfyUI's weights (no copy), through the reference's own loader."""
        return self.build_reference(self.diffusion_model.state_dict(), **options)

    @property
    def reference(self):
        """The shared inference DiT (tests that change a DiT make their own with ``reference_dit``)."""
        return self._reference

    def fresh(self):
        """This pair with clean weights (reloaded if an earlier test wrote into them)."""
        comfy.model_management.unload_all_models()  # takes LoRA patches of earlier samplings off
        if self.spoiled:
            self.load()
        return self


def pair_fixtures(family, checkpoint_shapes, build_reference, name):
    """The test module's fixtures: ``pair`` (module scope: the models, built once; the figures are printed
    at the end) and ``name`` (each test: the pair with clean weights, torch on every core)."""

    @pytest.fixture(scope="module", name="pair")
    def pair_fixture():
        made = Pair(checkpoint_shapes(), build_reference)
        yield made
        print_figures(family.name)

    @pytest.fixture(name=name)
    def clean_pair(pair):
        with all_cores():
            yield pair.fresh()

    return pair_fixture, clean_pair


# ---------------------------------------------------------------------------------------------------
# Masks: PIL images, as the reference takes them (white on black, RGB)

def box_mask(size, box, value=255):
    """An RGB mask of ``size`` (w, h) with the box (left, top, right, bottom), in fractions, set to ``value``."""
    width, height = size
    array = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    array[round(top * height):round(bottom * height), round(left * width):round(right * width)] = value
    return Image.fromarray(array).convert("RGB")


def blob_mask(size, seed):
    """An RGB mask of ``size`` (w, h) with a few random soft-edged blobs (grey levels around the threshold)."""
    width, height = size
    generator = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    field = np.zeros((height, width))
    for _ in range(3):
        cy, cx = generator.uniform(0, height), generator.uniform(0, width)
        radius = generator.uniform(0.15, 0.35) * min(width, height)
        field += np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2))
    array = np.clip(field * 200, 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def mask_tensor(image):
    """A PIL mask as ComfyUI's MASK ``[1, H, W]`` in [0, 1] (the channels are equal)."""
    return torch.from_numpy(np.asarray(image)[..., 0].astype(np.float32) / 255.0)[None]


def mask_set(name, image):
    """The entity masks of the named case for an image of ``image`` (w, h) pixels."""
    if name == "one":
        return [box_mask(image, (0.1, 0.2, 0.6, 0.9))]
    if name == "two overlapping":
        return [box_mask(image, (0.0, 0.0, 0.6, 0.7)), box_mask(image, (0.4, 0.3, 1.0, 1.0))]
    if name == "four at other sizes":
        # 1.5x, 0.5x and 3.125x the image, and a soft-edged blob at 1.25x: each resized from its own size
        scaled = [(round(image[0] * f), round(image[1] * f)) for f in (1.5, 0.5, 3.125, 1.25)]
        return [box_mask(scaled[0], (0.0, 0.0, 0.5, 0.5)), box_mask(scaled[1], (0.4, 0.1, 0.9, 0.6)),
                box_mask(scaled[2], (0.13, 0.5, 0.71, 1.0)), blob_mask(scaled[3], seed=3)]
    if name == "eight overlapping blobs":
        return [blob_mask(image, seed=10 + k) for k in range(8)]
    raise KeyError(name)


def comfy_entities(embeds, masks):
    """ELIGEN_ENTITIES through the EliGen Entity node: one text embedding [1, L, D] and one PIL mask each."""
    entities = None
    for index, (embed, mask) in enumerate(zip(embeds, masks)):
        entities = EliGenEntity.execute(mask=mask_tensor(mask), conditioning=[[embed, {}]], label=f"entity {index}",
                                        previous=entities).result[0]
    return entities


def apply_entities(model, positive, negative, embeds, masks, on_negative=False):
    """(model, positive, negative) from the EliGen Apply node."""
    return EliGenApply.execute(model=model, positive=positive, entities=comfy_entities(embeds, masks),
                               negative=negative, entities_on_negative=on_negative).result


@contextlib.contextmanager
def all_cores():
    """These tests run two real-width models: torch may use every core (tests/conftest.py sets one thread
    per test for the tiny models); the setting is given back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# The reference's pipeline object, without text encoders or VAE

class ReferencePipeline:
    """A DiffSynth-Studio pipeline (``pipeline_class``) around a DiT: its EliGen unit's mask preprocessing,
    its model function, its CFG, its scheduler and step. ``shared``: the inputs every call gets besides
    the latents (FLUX: the embedded guidance; Qwen-Image: the image size)."""

    def __init__(self, pipeline_class, unit_class, dit, latent_hw, **shared):
        self.pipe = pipeline_class(device="cpu", torch_dtype=torch.float32)
        self.pipe.dit = dit
        self.unit_class = unit_class
        self.latent_hw = latent_hw
        self.shared = shared

    def masks(self, images):
        """The reference's entity masks ``[1, N, 1, h, w]`` from PIL masks of any size."""
        masks = self.unit_class().preprocess_masks(self.pipe, list(images), self.latent_hw[0], self.latent_hw[1], 1)
        return torch.cat(masks, dim=0).unsqueeze(0)

    def _call(self, shared, timestep, positive, negative, cfg):
        return self.pipe.cfg_guided_model_fn(self.pipe.model_fn, cfg, shared, positive, negative or {},
                                             dit=self.pipe.dit, timestep=timestep)

    def velocity(self, x, sigma, positive, negative=None, cfg=1.0):
        with torch.no_grad():
            return self._call(dict(self.shared, latents=x), torch.tensor([sigma * 1000.0]), positive, negative, cfg)

    def run(self, x, steps, positive, negative=None, cfg=1.0, **timestep_options):
        """The reference's denoising loop from ``x`` (its scheduler's sigmas: ``sigmas()`` gives them)."""
        self.pipe.scheduler.set_timesteps(steps, **timestep_options)
        shared = dict(self.shared, latents=x)
        with torch.no_grad():
            for progress_id, timestep in enumerate(self.pipe.scheduler.timesteps):
                v = self._call(shared, timestep.unsqueeze(0), positive, negative, cfg)
                shared["latents"] = self.pipe.step(self.pipe.scheduler, progress_id=progress_id, noise_pred=v, **shared)
        return shared["latents"]

    def sigmas(self, steps, **timestep_options):
        """The sigmas ``run`` steps through, ending at 0 (what ComfyUI's sampler takes)."""
        self.pipe.scheduler.set_timesteps(steps, **timestep_options)
        return torch.cat([self.pipe.scheduler.sigmas.float(), torch.zeros(1)])


# ---------------------------------------------------------------------------------------------------
# ComfyUI's stock sampling path

def comfy_velocity(model, positive, negative, noise, sigma, cfg):
    """One model evaluation through ``comfy.sample.sample_custom`` (CFGGuider, conditioning batching, the
    model's wrappers): returns (the latent the model saw, the CFG-combined velocity)."""
    seen = {}

    @torch.no_grad()  # as ComfyUI's own samplers (else autograd would keep the weights it used)
    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        denoised = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        seen["x"], seen["denoised"] = x.clone(), denoised.clone()
        return denoised

    sigmas = torch.tensor([float(sigma), 0.0])
    comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.KSAMPLER(one_call), sigmas, positive, negative,
                               torch.zeros_like(noise), disable_pbar=True, seed=0)
    return seen["x"], (seen["x"] - seen["denoised"]) / float(sigma)


def comfy_euler(model, positive, negative, noise, sigmas, cfg):
    """A whole Euler sampling run through the stock path; returns the final latent in the model's space
    (before ``process_latent_out``, as the reference's loop ends)."""
    sampler = comfy.samplers.sampler_object("euler")
    out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, torch.zeros_like(noise),
                                     disable_pbar=True, seed=0)
    return model.model.process_latent_in(out)


@contextlib.contextmanager
def rule_with_global_seeing_entities(dit, lengths):
    """The reference's DiT with an altered rule, for checks that the comparison notices a divergence: the
    global prompt's text and every entity's text see each other (``lengths``: ``[L1 .. LN, LG]``)."""
    original = type(dit).process_entity_masks
    entity_end, global_end = sum(lengths[:-1]), sum(lengths)

    def altered(*args, **kwargs):
        prompt, rotary, mask = original(dit, *args, **kwargs)
        mask = mask.clone()
        mask[..., entity_end:global_end, :entity_end] = 0
        mask[..., :entity_end, entity_end:global_end] = 0
        return prompt, rotary, mask

    dit.process_entity_masks = altered
    try:
        yield
    finally:
        del dit.process_entity_masks


def initial_lora(diffusion_model, names, rank, seed):
    """``{module: (A [rank, in], B [out, rank])}``: non-zero (so that both get gradients), seeded."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name in names:
        module = diffusion_model.get_submodule(name)
        values[name] = (torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5,
                        torch.randn(module.out_features, rank, generator=generator) * 0.5 / rank ** 0.5)
    return values


def set_lora(layers, values):
    assert sorted(layers) == sorted(values), ("LoRA modules differ", sorted(set(layers) ^ set(values))[:6])
    with torch.no_grad():
        for name, (a, b) in values.items():
            layers[name].lora_A[lora.ADAPTER_NAME].weight.copy_(a)
            layers[name].lora_B[lora.ADAPTER_NAME].weight.copy_(b)


def lora_gradients(layers, rename=lambda name: name):
    grads = {}
    for name, layer in layers.items():
        grads[rename(name) + " A"] = layer.lora_A[lora.ADAPTER_NAME].weight.grad
        grads[rename(name) + " B"] = layer.lora_B[lora.ADAPTER_NAME].weight.grad
    return grads


def eligen_targets(model_patcher):
    """This package's "eligen" LoRA preset: the ComfyUI module names it wraps."""
    adapter = adapter_for(model_patcher)
    settings = lora.LoraSettings(preset="eligen")
    return lora.matching_linears(model_patcher.model.diffusion_model, lora.target_patterns(settings, adapter))


def package_training_step(model_patcher, rank, values, x0, noise, index, context, pooled, lengths, masks,
                          guidance=1.0, checkpointing=True, rename=lambda name: name):
    """One training step of this package: the EliGen patch, the "eligen" LoRA (alpha = rank) set to
    ``values``, the out-of-place training blocks, the reference timestep table (``index``) and the
    flow-matching loss. Returns (loss, LoRA gradients by ``rename``-d module name)."""
    model = patch.patch_model(model_patcher)
    adapter = adapter_for(model)
    diffusion_model = model.model.diffusion_model
    lora.inject(diffusion_model, lora.LoraSettings(rank=rank, alpha=float(rank), preset="eligen"), adapter)
    try:
        layers = lora.lora_layers(diffusion_model)
        set_lora(layers, values)
        sampler = loss.TimestepSampler("reference", schedule=adapter.reference_schedule)
        sigma, weight = sampler.sigmas[index:index + 1], sampler.weights[index:index + 1]
        # What sampling hands the diffusion model: the EliGen DIFFUSION_MODEL wrapper of the patched clone.
        kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        options = {"wrappers": {kind: {patch.WRAPPER_KEY: model.get_wrappers(kind, patch.WRAPPER_KEY)}}}
        options = blocks.training_transformer_options(diffusion_model, adapter.training_blocks, options, checkpointing)
        condition = conditioning.EntityCondition.for_training(lengths, masks)
        prediction = adapter.training_forward(model.model, loss.noisy_latent(x0, noise, sigma), sigma, context, pooled,
                                              condition, options, guidance=guidance)
        value = loss.flow_matching_loss(prediction, loss.velocity_target(x0, noise), weight)
        value.backward()
        return value.detach(), lora_gradients(layers, rename)
    finally:
        lora.remove(diffusion_model)


def reference_draws(seed, x0):
    """What the reference's training loss draws from the global generator after ``torch.manual_seed(seed)``:
    the timestep index, then the noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        index = int(torch.randint(0, 1000, (1,)))
        return index, torch.randn_like(x0)


def reference_training_step(pipe, targets, rank, values, seed, **inputs):
    """One training step of the reference: its training set-up on ``pipe`` (1000-step training scheduler,
    frozen DiT, peft LoRA on ``targets`` with alpha = rank) with the LoRA set to ``values``, then its
    loss with the global generator seeded. Returns (loss, LoRA gradients by module)."""
    ref = reference()
    ref.training_module.DiffusionTrainingModule().switch_pipe_to_training_mode(
        pipe, None, lora_base_model="dit", lora_target_modules=targets, lora_rank=rank)
    layers = lora.lora_layers(pipe.dit)  # the peft layers in the reference's DiT
    set_lora(layers, values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        value = ref.loss.FlowMatchSFTLoss(pipe, use_gradient_checkpointing=False, **inputs)
    value.backward()
    return value.detach(), lora_gradients(layers)


def write_reference_lora(model_patcher, rank, alpha, seed, path):
    """The "eligen" LoRA (seeded values, ``alpha``) as this package writes it in the reference's format
    (the family adapter's ``lora_reference_format``); returns the ComfyUI module names it holds."""
    adapter = adapter_for(model_patcher)
    diffusion_model = model_patcher.model.diffusion_model
    names = lora.inject(diffusion_model, lora.LoraSettings(rank=rank, alpha=alpha, preset="eligen"), adapter)
    try:
        set_lora(lora.lora_layers(diffusion_model), initial_lora(diffusion_model, names, rank, seed))
        comfy_form = lora.lora_state_dict(diffusion_model)
    finally:
        lora.remove(diffusion_model)
    lora_formats.save_lora(path, lora_formats.to_reference(comfy_form, adapter.lora_reference_format))
    return names


# ---------------------------------------------------------------------------------------------------
# The comparisons, written once for both families

class Family:
    """What differs between the families in the comparisons: inputs on each side and the reference's
    pipeline. Subclasses set the attributes and the methods that raise here."""

    name = ""
    image = (96, 64)          # (width, height) in pixels: non-square, so that a transposed grid shows
    global_length = 8         # tokens of the global prompt
    rank = 4                  # LoRA rank of the training and LoRA checks
    reference_lora_targets = ""  # the reference's EliGen training targets (its training script's list)
    lora_format = ""          # what ``lora_formats.detect_format`` must call the file written for the reference
    training_guidance = None  # embedded guidance the reference trains with (guidance-distilled models)

    @property
    def latent(self):
        return self.image[1] // 8, self.image[0] // 8

    def prompt(self, seed, length=None):
        """Random text embeddings [1, L, D] (D: the model's text width)."""
        raise NotImplementedError

    def pooled(self, seed):
        """The pooled text vector of a prompt (None: the family has none)."""

    def comfy_prompt(self, seed):
        raise NotImplementedError

    def entity_embeds(self, seed, lengths):
        return [self.prompt(seed * 100 + k, length) for k, length in enumerate(lengths)]

    def noise(self, seed=7):
        """A latent in ComfyUI's shape."""
        raise NotImplementedError

    def to_reference(self, latent):
        """ComfyUI's latent -> the reference's shape (and ``from_reference`` back)."""
        return latent

    def from_reference(self, latent):
        return latent

    def pipeline(self, dit):
        raise NotImplementedError

    def reference_inputs(self, seed, embeds=None, masks=None):
        """The reference's inputs of one CFG branch: the prompt of ``seed`` and the entities."""
        raise NotImplementedError

    def training_inputs(self):
        """What the reference's training loss takes besides the latent, prompt and entities."""
        return {}

    def entity_step(self, dit, lengths):
        """A context in which the reference's DiT takes entity texts of these ``lengths``."""
        return contextlib.nullcontext()

    def reference_module(self, name):
        """ComfyUI's module name -> the reference's."""
        return name

    def apply(self, model, embeds, masks, on_negative=False):
        """EliGen Apply with the positive prompt of seed 1 and the negative of seed 2."""
        return apply_entities(model, self.comfy_prompt(1), self.comfy_prompt(2), embeds, masks, on_negative)

    def reference_velocity(self, run, x, sigma, positive, negative=None, cfg=1.0):
        return self.from_reference(run.velocity(self.to_reference(x), sigma, positive, negative, cfg))


def check_plain_forward(family, pair):
    """The plain forward (no entities) through ComfyUI's sampling path and the reference's model function."""
    x, ours = comfy_velocity(pair.comfy, family.comfy_prompt(1), family.comfy_prompt(2), family.noise(), 0.75, 1.0)
    theirs = family.reference_velocity(family.pipeline(pair.reference), x, 0.75, family.reference_inputs(1))
    assert_same(family.name, "plain forward (no entities)", ours, theirs)
    return x, ours


def check_entity_call(family, pair, case, masks_name, lengths, divergence=False):
    """One model call with entities (EliGen Apply, the stock sampling path) against the reference's model
    function with ``entity_prompt_emb`` / ``entity_masks``. With ``divergence``, also against the
    reference with its rule altered (the global prompt and the entities see each other): the difference
    must then be far above the tolerance, so the comparison would notice this package doing that."""
    images = mask_set(masks_name, family.image)
    embeds = family.entity_embeds(len(lengths), lengths)
    model, positive, negative = family.apply(pair.comfy, embeds, images)
    x, ours = comfy_velocity(model, positive, negative, family.noise(), 0.75, 1.0)
    run = family.pipeline(pair.reference)
    inputs = family.reference_inputs(1, embeds, run.masks(images))
    with family.entity_step(pair.reference, lengths):
        theirs = family.reference_velocity(run, x, 0.75, inputs)
    assert_same(family.name, case, ours, theirs)
    if divergence:
        with rule_with_global_seeing_entities(pair.reference, list(lengths) + [family.global_length]):
            altered = family.reference_velocity(run, x, 0.75, inputs)
        assert difference(ours, altered)[1] > MATTERS


def check_cfg_on_negative(family, pair, lengths, cfg):
    """CFG with the entities on the negative branch: the negative prompt in every entity slot, same masks."""
    images = mask_set("two overlapping", family.image)
    embeds = family.entity_embeds(2, lengths)
    model, positive, negative = family.apply(pair.comfy, embeds, images, on_negative=True)
    x, ours = comfy_velocity(model, positive, negative, family.noise(), 0.6, cfg)
    run = family.pipeline(pair.reference)
    masks = run.masks(images)
    negative_slots = [family.prompt(2)] * len(lengths)
    with family.entity_step(pair.reference, lengths):
        theirs = family.reference_velocity(run, x, 0.6, family.reference_inputs(1, embeds, masks),
                                           family.reference_inputs(2, negative_slots, masks), cfg)
    assert_same(family.name, f"CFG {cfg:g}, entities on the negative", ours, theirs)


def check_sampling_run(family, pair, lengths, steps, **timestep_options):
    """A whole Euler run through the stock path on the reference scheduler's sigmas, against the
    reference's own loop (its scheduler and step), from the same noise."""
    images = mask_set("two overlapping", family.image)
    embeds = family.entity_embeds(2, lengths)
    run = family.pipeline(pair.reference)
    model, positive, negative = family.apply(pair.comfy, embeds, images)
    ours = comfy_euler(model, positive, negative, family.noise(11), run.sigmas(steps, **timestep_options), 1.0)
    with family.entity_step(pair.reference, lengths):
        theirs = run.run(family.to_reference(family.noise(11)), steps, family.reference_inputs(1, embeds, run.masks(images)),
                         **timestep_options)
    assert_same(family.name, f"sampling run ({steps} Euler steps, 2 entities)", ours, family.from_reference(theirs))


def check_training_step(family, pair, lengths, seed=5):
    """One sample with entities, the timestep and noise the reference's loss draws: loss and LoRA
    gradients of this package's training step against the reference's, from the same initial LoRA."""
    images = mask_set("two overlapping", family.image)
    embeds = family.entity_embeds(3, lengths)
    x0 = family.to_reference(torch.randn(family.noise().shape, generator=torch.Generator().manual_seed(12)))
    index, noise = reference_draws(seed, x0)
    values = initial_lora(pair.diffusion_model, eligen_targets(pair.comfy), family.rank, seed=9)

    masks = torch.cat([mask_tensor(image) for image in images])[None]
    ours_loss, ours_grads = package_training_step(
        pair.comfy, family.rank, values, x0, noise, index, torch.cat(embeds + [family.prompt(4)], dim=1),
        family.pooled(4), list(lengths) + [family.global_length], masks, guidance=family.training_guidance or 1.0,
        rename=family.reference_module)

    run = family.pipeline(pair.reference_dit())
    with family.entity_step(run.pipe.dit, lengths):
        theirs_loss, theirs_grads = reference_training_step(
            run.pipe, family.reference_lora_targets, family.rank, {family.reference_module(n): v for n, v in values.items()},
            seed, input_latents=x0, **family.training_inputs(), **family.reference_inputs(4, embeds, run.masks(images)))

    assert_same(family.name, f"training loss (timestep index {index})", ours_loss, theirs_loss)
    assert_gradients_same(family.name, ours_grads, theirs_grads)


def check_lora_roundtrip(family, pair, folder, capsys, lengths):
    """The "eligen" LoRA this package writes in the reference's format (alpha != rank, so its scale
    matters): loaded the ComfyUI way (this package's loader, the stock LoRA patching) and the reference's
    way (its pipeline's ``load_lora``), the same output with entities."""
    from comfyui_eligen.nodes.lora import load_eligen_lora

    path = os.path.join(str(folder), "eligen.safetensors")
    names = write_reference_lora(pair.comfy, family.rank, family.rank / 2, seed=13, path=path)
    assert lora_formats.detect_format(lora_formats.load_lora(path)) == family.lora_format
    images = mask_set("two overlapping", family.image)
    embeds = family.entity_embeds(2, lengths)

    with_lora = load_eligen_lora(pair.comfy, path, 1.0, source="eligen.safetensors")
    assert len(with_lora.patches) == len(names)
    model, positive, negative = family.apply(with_lora, embeds, images)
    x, ours = comfy_velocity(model, positive, negative, family.noise(), 0.75, 1.0)
    comfy.model_management.unload_all_models()  # ComfyUI's LoRA patches come off its weights

    # The reference fuses the LoRA into the weights it shares with ComfyUI: they are reloaded before reuse.
    pair.spoiled = True
    run = family.pipeline(pair.reference_dit())
    capsys.readouterr()
    run.pipe.load_lora(run.pipe.dit, path, alpha=1)
    assert f"{len(names)} tensors are fused by LoRA" in capsys.readouterr().out
    with family.entity_step(run.pipe.dit, lengths):
        theirs = family.reference_velocity(run, x, 0.75, family.reference_inputs(1, embeds, run.masks(images)))
    assert_same(family.name, f"LoRA written in {family.lora_format} form: output with it, 2 entities", ours, theirs)
