"""The model side of training: the MODEL with LoRA layers injected (``TrainingModel``), its forward,
and the flow-matching loss of a micro-batch through it (``batch_loss``)."""

import torch

from ..core import blocks, host
from ..core.adapters import adapter_for
from ..core.patch import patch_model
from . import lora, offload
from .batching import group_by_layout, stack_condition
from .loss import entity_region_weight, flow_matching_loss, noisy_latent, velocity_target
from .settings import PRECISIONS


class TrainingModel:
    """The patched MODEL with LoRA layers injected, and the forward used by training and validation.

    Use as a context manager: leaving it removes the LoRA layers, whatever happened.
    """

    def __init__(self, model_patcher, lora_settings, gradient_checkpointing=False, seed=0, memory=None,
                 distributed=None):
        self.adapter = adapter_for(model_patcher)
        lora_settings.validate(self.adapter)
        self.patched = patch_model(model_patcher)
        self.base_model = self.patched.model
        self.diffusion_model = self.base_model.diffusion_model
        self.lora_settings = lora_settings
        self.gradient_checkpointing = gradient_checkpointing
        self.seed = seed
        self.device = self.patched.load_device
        self._swapped = []
        # FSDP (headless under torchrun only): the base is sharded, so the MODEL is not reusable afterwards.
        self.fsdp = distributed if distributed is not None and distributed.fsdp else None
        # The memory plan, before loading: block swap (training/offload.py) only when the budget needs it
        # or a block count is given; otherwise the model loads the usual way.
        self.memory_plan = None
        if memory is not None:
            budget = offload.memory_budget(memory.max_vram_gb, self.device, sharded=self.fsdp is not None)
            self.memory_plan = offload.plan_memory(
                self.diffusion_model, self.adapter.training_blocks,
                lora.parameter_count(self.diffusion_model, lora_settings, self.adapter),
                lora.DTYPES[lora_settings.dtype], memory, budget, self.compute_dtype, gradient_checkpointing)
            offload.log_plan(budget, self.memory_plan)
        swaps = self.memory_plan is not None and self.memory_plan.swaps
        self.offload = offload.SwapSession(self.patched, self.device, self.memory_plan) if swaps else None

    def __enter__(self):
        if self.offload is not None:
            self.offload.load()
        else:
            host.memory.unload_models_on(self.device)  # text encoders, VAE: nothing else on the device during steps
            if self.fsdp is None or self.device.type == "cpu":  # on GPUs FSDP moves only each rank's shard there
                host.memory.load_for_training(self.patched)
        try:
            self._swapped = host.memory.alias_inference_tensors(self.diffusion_model)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # peft draws the initial A matrices from the global generator
                self.targets = lora.inject(self.diffusion_model, self.lora_settings, self.adapter)
            self.parameters = lora.lora_parameters(self.diffusion_model)
            if self.offload is not None:
                self.offload.start(self.diffusion_model, self.adapter.training_blocks, self.parameters)
            if self.fsdp is not None:
                self.fsdp.shard_frozen_base(self.diffusion_model, self.parameters)
            self._options = self._transformer_options()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.offload is not None:
                self.offload.close_swapper()
            lora.remove(self.diffusion_model)
        finally:
            host.memory.restore_tensors(self._swapped)
            if self.offload is not None:
                self.offload.unload()
        return False

    def _transformer_options(self):
        # What sampling would give the diffusion model (patches, attention override, wrappers), plus
        # the out-of-place training blocks.
        options = host.models.sampling_transformer_options(self.patched)
        return blocks.training_transformer_options(
            self.diffusion_model, self.adapter.training_blocks, options, self.gradient_checkpointing,
            block_wrapper=self.offload.block_wrapper if self.offload is not None else None,
        )

    def velocity(self, x_t, sigma, context, pooled, entity_condition, guidance=1.0):
        return self.adapter.training_forward(
            self.base_model, x_t, sigma, context, pooled, entity_condition, dict(self._options), guidance
        )

    @property
    def compute_dtype(self):
        """The dtype the model computes in (as BaseModel.apply_model: fp8 weights run in their cast dtype)."""
        return host.models.compute_dtype(self.base_model)

    @property
    def latent_format(self):
        return self.patched.get_model_object("latent_format")


def batch_loss(training_model, batch, sigma_sampler, settings, generator, denominator=None):
    """Weighted flow-matching loss of one micro-batch: the sum over its samples / ``denominator`` (default:
    their count, i.e. the mean). ``generator``: one per sample (noise, then timestep), or one for all."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(batch)
    total, count = 0.0, 0
    device = training_model.device
    autocast = PRECISIONS[settings.precision]
    by_sample = {id(s): g for s, g in zip(batch, generators)}
    for group in group_by_layout(batch):
        x0 = torch.stack([s.latent for s in group]).to(device)
        x0 = x0.to(torch.promote_types(x0.dtype, torch.float32))
        noise, sigma, weight = [], [], []
        for s in group:
            noise.append(torch.randn((1,) + tuple(s.latent.shape), generator=by_sample[id(s)]))
            sigma_s, weight_s = sigma_sampler(1, by_sample[id(s)])
            sigma.append(sigma_s)
            weight.append(weight_s)
        noise = torch.cat(noise).to(x0)
        sigma, weight = torch.cat(sigma).to(device), torch.cat(weight).to(device)
        context, pooled, condition = stack_condition(group, device)
        region = None
        if settings.entity_weight and condition is not None:
            masks = torch.stack([s.masks for s in group])
            region = entity_region_weight(masks, x0.shape[-2:], settings.entity_weight).to(device)
        x_t = noisy_latent(x0, noise, sigma)
        dtype = training_model.compute_dtype
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            prediction = training_model.velocity(x_t.to(dtype), sigma, context.to(dtype),
                                                 None if pooled is None else pooled.to(dtype), condition)
        loss = flow_matching_loss(prediction, velocity_target(x0, noise), weight, region)
        total = total + loss * len(group)
        count += len(group)
    return total / (denominator or count)
