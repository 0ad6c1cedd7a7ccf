"""Contract tests: one per contact point with ComfyUI internals (core/host/, registered by area).

When a ComfyUI update changes one of them, the failing test names the contact point, so the break is
found in a minute. The last tests remove a capability in process and check that the refusal names it
(tests/server/test_host_versions.py does the same in a real server); the ``compat`` tests are also the
selection CI runs on ComfyUI versions outside the tested range.
"""

import contextlib
import logging
import os

import pytest
import torch

import comfy.ldm.flux.math
import comfy.lora
import comfy.sample
from comfyui_eligen.core import conditioning, host, patch
from comfyui_eligen.core.adapters import adapter_for
from tiny_models import TEXT_WIDTH, tiny_flux, tiny_qwen_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}


@contextlib.contextmanager
def contact(name):
    """Turn any failure inside into one that names the contact point and the ComfyUI version."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the point is to name whatever broke
        pytest.fail(f"contact point '{name}' changed in ComfyUI {host.comfyui_version()}: "
                    f"{type(error).__name__}: {error}", pytrace=False)


def run_forward(model, options=None, entities=False):
    """One diffusion-model forward of a tiny model through its ``forward`` (the wrapper path)."""
    adapter = adapter_for(model)
    lengths = [3, 5]
    x = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, sum(lengths), TEXT_WIDTH, generator=torch.Generator().manual_seed(1))
    condition = None
    if entities:
        masks = torch.zeros(1, 1, 8, 12)
        masks[..., :4] = 1
        condition = conditioning.EntityCondition.for_training(lengths, masks)
    pooled = torch.randn(1, TEXT_WIDTH, generator=torch.Generator().manual_seed(2))
    return adapter.training_forward(model.model, x, torch.tensor([0.5]), context, pooled, condition,
                                    dict(options or {}))


# ---- one test per contact point ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(host.CONTACTS))
def test_every_startup_check_passes(name):
    with contact(name):
        host.CONTACTS[name]()


def test_comfyui_version_is_read():
    with contact("comfyui_version.py"):
        assert host.version_tuple(host.comfyui_version()) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_model_classes_recognise_the_families(family):
    with contact("model classes"):
        model = FAMILIES[family]()
        assert host.models.is_base_model(model.model)
        assert adapter_for(model).family == family
        assert adapter_for(model.model.diffusion_model).family == family


def test_flux_params_tell_flux1():
    with contact("FluxParams (axes_dim, global_modulation)"):
        assert host.models.flux1_params(tiny_flux().model.diffusion_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_argument_indices_point_at_the_arguments(family):
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append((args, host.models.wrapped_diffusion_model(executor)))
        return executor(*args, **kwargs)

    options = {"wrappers": {host.models.diffusion_model_wrapper_type(): {"probe": [wrapper]}}}
    with contact("diffusion model forward arguments / WrapperExecutor.class_obj"):
        run_forward(model, options)
        args, wrapped = seen[0]
        assert wrapped is model.model.diffusion_model
        assert args[adapter.CONTEXT_INDEX].shape == (1, 8, TEXT_WIDTH)
        assert isinstance(args[adapter.TRANSFORMER_OPTIONS_INDEX], dict)
        assert args[adapter.REF_LATENTS_INDEX] is None


def test_diffusion_model_wrapper_registers_on_a_patcher():
    with contact("DIFFUSION_MODEL wrapper"):
        model = tiny_flux().clone()
        host.models.add_diffusion_model_wrapper(model, "probe", patch.EntityWrapper(adapter_for(model), model.model))
        assert len(host.models.diffusion_model_wrappers(model, "probe")) == 1
        assert host.models.sampling_transformer_options(model)["wrappers"][host.models.diffusion_model_wrapper_type()]["probe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_override_sees_every_attention_call(family):
    calls = []

    def override(func, *args, **kwargs):
        calls.append(kwargs["transformer_options"].get("block_type"))
        return func(*args, **kwargs)

    with contact("attention override"):
        run_forward(FAMILIES[family](), {"optimized_attention_override": override})
        assert len(calls) >= 2


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_override_arguments(family):
    """core/attention.py reads the override's arguments as (q, k, v, heads[, mask]) plus keyword arguments
    (mask=, skip_reshape=, transformer_options=)."""
    seen = []

    def override(func, *args, **kwargs):
        seen.append((args, kwargs))
        return func(*args, **kwargs)

    with contact("attention override arguments (q, k, v, heads, mask)"):
        run_forward(FAMILIES[family](), {"optimized_attention_override": override})
        for args, kwargs in seen:
            assert len(args) >= 4, f"the override got {len(args)} positional arguments"
            q, k, v, heads = args[:4]
            assert all(isinstance(t, torch.Tensor) for t in (q, k, v)) and isinstance(heads, int)
            assert isinstance(kwargs.get("transformer_options"), dict)


def test_flux_block_internals():
    with contact("FLUX double / single block parts, block lists"):
        diffusion_model = tiny_flux().model.diffusion_model
        for block in host.models.block_list(diffusion_model, "double_blocks"):
            parts = host.models.flux_double_block_parts(block)
            assert parts.modulated and parts.img_attn is block.img_attn and parts.num_heads == block.num_heads
        for block in host.models.block_list(diffusion_model, "single_blocks"):
            parts = host.models.flux_single_block_parts(block)
            assert parts.modulated and 3 * parts.hidden_size + parts.mlp_width == block.linear1.out_features
    with pytest.raises(host.MissingCapability, match=r"FLUX double block parts: Linear has neither modulation"):
        host.models.flux_double_block_parts(torch.nn.Linear(2, 2))
    with pytest.raises(host.MissingCapability, match=r"diffusion model block lists: Flux has no block list blocks"):
        host.models.block_list(diffusion_model, "blocks")


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replacements_get_their_arguments(family):
    model = FAMILIES[family]()
    diffusion_model = model.model.diffusion_model
    adapter = adapter_for(model)
    calls = []

    def make(kind):
        def replacement(args, extra):
            host.models.check_block_args(kind, args, extra)
            calls.append((kind, args["pe"]))
            return extra["original_block"](args)
        return lambda index, existing: replacement

    options = {}
    for kind, (attribute, _) in adapter.training_blocks.items():
        options = host.models.with_block_replacements(options, kind, len(getattr(diffusion_model, attribute)), make(kind))
    with contact("patches_replace['dit'] block replacement arguments"):
        run_forward(model, options)
        expected = sum(len(getattr(diffusion_model, a)) for a, _ in adapter.training_blocks.values())
        assert len(calls) == expected


def test_qwen_image_pe_layout():
    model = tiny_qwen_image()
    seen = []

    def replacement(args, extra):
        seen.append(args["pe"])
        return extra["original_block"](args)

    options = host.models.with_block_replacements({}, "double_block", 1, lambda index, existing: replacement)
    with contact("Qwen-Image pe layout"):
        run_forward(model, options)
        axis = host.models.rope_sequence_axis(seen[0])
        assert seen[0].shape[axis] == 8 + 4 * 6  # text tokens + image tokens of the 8x12 latent


def test_qwen_image_block_call():
    model = tiny_qwen_image()
    block = model.model.diffusion_model.transformer_blocks[0]
    pe = []
    options = host.models.with_block_replacements({}, "double_block", 1, lambda i, e: lambda a, x: (pe.append(a), x["original_block"](a))[1])
    run_forward(model, options)
    args = pe[0]
    with contact("Qwen-Image block forward(transformer_options=)"):
        txt, img = host.models.qwen_image_block(block, args["img"], args["txt"], args["vec"], args["pe"], {})
        assert img.shape == args["img"].shape and txt.shape == args["txt"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_entity_attention_end_to_end(family):
    """Wrapper + override + (Qwen-Image) pe swap together change the output."""
    model = patch.patch_model(FAMILIES[family]())
    options = host.models.sampling_transformer_options(model)
    with contact("EliGen model patch (wrapper, override, block replacements)"):
        plain = run_forward(model, options)
        entity = run_forward(model, options, entities=True)
        assert not torch.allclose(plain, entity)


def test_model_patcher_backup_holds_the_originals():
    model = tiny_flux()
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    module = "diffusion_model.double_blocks.0.img_attn.qkv"
    original = model.model.state_dict()[key].clone()
    lora = {f"{module}.lora_up.weight": torch.ones(original.shape[0], 2),
            f"{module}.lora_down.weight": torch.ones(2, original.shape[1])}
    with contact("ModelPatcher.backup / ModelPatcher.patches / sd.load_lora_for_models"):
        patched = host.weights.apply_lora(model, lora, 1.0)
        assert key in host.weights.weight_patches(patched) and not host.weights.weight_patches(model)
        patched.patch_model()
        try:
            assert not torch.equal(patched.model.state_dict()[key], original)
            torch.testing.assert_close(host.weights.patched_weight_originals(patched)[key].to(original), original)
        finally:
            patched.unpatch_model()


def test_load_for_training_and_module_tensor_slots():
    model = tiny_flux()
    with contact("model_management.load_models_gpu / module tensor slots"):
        host.memory.load_for_training(model)
        diffusion_model = model.model.diffusion_model
        with torch.inference_mode():
            inference = torch.ones(3)
        diffusion_model.img_in.register_buffer("probe", inference)
        swapped = host.memory.alias_inference_tensors(diffusion_model)
        assert not diffusion_model.img_in.probe.is_inference()
        host.memory.restore_tensors(swapped)
        assert diffusion_model.img_in.probe is inference


LORA_CASES = {
    "comfy": ("diffusion_model.{m}.lora_up.weight", "diffusion_model.{m}.lora_down.weight", "diffusion_model.{m}.alpha"),
    "kohya": ("lora_unet_{u}.lora_up.weight", "lora_unet_{u}.lora_down.weight", "lora_unet_{u}.alpha"),
    "peft": ("diffusion_model.{m}.lora_B.weight", "diffusion_model.{m}.lora_A.weight"),
    "lone_down": ("diffusion_model.{m}.lora_down.weight",),
    "unknown_module": ("diffusion_model.{m}_nowhere.lora_up.weight", "diffusion_model.{m}_nowhere.lora_down.weight"),
    "diff": ("diffusion_model.{m}.diff", "diffusion_model.{m}.diff_b"),
    "loha": ("diffusion_model.{m}.hada_w1_a", "diffusion_model.{m}.hada_w1_b", "diffusion_model.{m}.hada_w2_a",
             "diffusion_model.{m}.hada_w2_b"),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_unmatched_lora_keys_agree_with_the_stock_loader(case):
    """host computes unmatched keys from the key map; the stock loader's own report is the oracle here."""
    model = tiny_flux()
    module = "double_blocks.0.img_attn.qkv"
    state_dict = {k.format(m=module, u=module.replace(".", "_")): torch.ones(2, 2) for k in LORA_CASES[case]}
    state_dict = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in state_dict.items()}
    key_map = host.weights.lora_key_map(model)
    dropped = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("lora key not loaded: "):
                dropped.append(record.getMessage()[len("lora key not loaded: "):])

    handler = Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        comfy.lora.load_lora(state_dict, key_map, log_missing=True)
    except Exception:  # noqa: BLE001 - odd shapes may fail to build; which keys were taken is decided first
        pass
    finally:
        root.removeHandler(handler)
    with contact("lora.load_lora key forms / lora.model_lora_keys_unet"):
        assert host.weights.lora_unmatched_keys(state_dict, key_map) == [k for k in state_dict if k in dropped]


def test_node_plumbing():
    model = tiny_flux()
    with contact("samplers.calculate_sigmas / utils.ProgressBar / interrupt check / conds.CONDRegular"):
        sigmas = host.models.simple_sigmas(model.get_model_object("model_sampling"), 4)
        assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
        bar = host.files.progress_bar(3)
        bar.update_absolute(1, 3)
        host.files.interrupt_check()()
        assert issubclass(conditioning.EntityCondition, host.models.regular_cond_class())
    assert host.files.send_progress_text("no node", None) is False  # cosmetic: nothing to show it on


@pytest.mark.parametrize("family", FAMILIES)
def test_model_sampling_dtype_and_widths(family):
    base_model = FAMILIES[family]().model
    with contact("model_sampling / manual_cast_dtype / txt_in.in_features / unet_config patch_size"):
        first, last = host.models.percent_to_sigma(base_model, 0.0), host.models.percent_to_sigma(base_model, 1.0)
        assert first > last >= 0.0
        low, high = host.models.timestep(base_model, torch.tensor([0.25, 0.75])).tolist()
        assert 0.0 < low < high
        assert host.models.compute_dtype(base_model) == torch.float32
        assert host.models.context_width(base_model.diffusion_model) == TEXT_WIDTH
        assert host.models.patch_size(base_model) == 2
    with pytest.raises(host.MissingCapability, match=r"txt_in.in_features\): Linear has no txt_in"):
        host.models.context_width(torch.nn.Linear(2, 2))


def test_flux_guidance_embed_is_read_from_the_params():
    diffusion_model = tiny_flux().model.diffusion_model
    with contact("FluxParams.guidance_embed"):
        assert host.models.flux_guidance_embedded(diffusion_model) is False
        assert "guidance" not in adapter_for(diffusion_model).forward_kwargs(diffusion_model, torch.zeros(1, TEXT_WIDTH), 1)


def test_quantized_attention_is_recognised():
    import comfy.ldm.modules.attention as comfy_attention

    with contact("attention.attention_sage"):
        assert host.attention.is_quantized_attention(comfy_attention.attention_sage)
        assert not host.attention.is_quantized_attention(comfy_attention.attention_pytorch)


def test_toy_world_contacts():
    with contact("toy world and cache keys: supported_models, ModelPatcher, sd.CLIP, sd.VAE, V1 nodes, sample"):
        from comfyui_eligen.toyworld import models

        assert host.encoders.prompt_weight_segments("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
        model, clip, vae = models.load_toy_models("flux", weights="pretrained")
        assert isinstance(host.encoders.text_encoder_module(clip), models.ToyTextEncoder)
        assert host.encoders.vae_downscale_ratio(vae) == models.POOL
        positive = host.models.encode_prompt(clip, "red circle")
        latent = host.models.empty_latent(model, 32, 32)
        samples = host.models.sample_latent(model, latent, 0, 1, 1.0, "euler", "simple", positive, positive)
        assert samples.shape == latent.shape and isinstance(vae, host.encoders.vae_class())
        assert isinstance(host.encoders.vae_identity_parts(vae)[0], torch.nn.Module)
        assert isinstance(host.encoders.clip_identity_parts(clip)[0], torch.nn.Module)


# ---- a capability removed -------------------------------------------------------------------------

def _attention_without_options(q, k, v, pe, mask=None):  # the 0.3.52 signature
    return ORIGINAL_FLUX_ATTENTION(q, k, v, pe=pe, mask=mask)


ORIGINAL_FLUX_ATTENTION = comfy.ldm.flux.math.attention
REMOVED = "comfy.ldm.flux.math.attention(transformer_options=)"


def test_a_removed_capability_is_named_in_process(monkeypatch):
    monkeypatch.setattr(comfy.ldm.flux.math, "attention", _attention_without_options)
    host.attention.flux_attention_function.cache_clear()
    try:
        assert any(p.contact == REMOVED for p in host.missing_capabilities())
        with pytest.raises(host.MissingCapability, match=r"ComfyUI .*" + REMOVED.replace("(", r"\(").replace(")", r"\)")):
            patch.patch_model(tiny_flux())
    finally:
        monkeypatch.undo()
        host.attention.flux_attention_function.cache_clear()


def test_a_newer_version_with_every_capability_runs_with_a_notice(monkeypatch, caplog):
    monkeypatch.setattr(host, "comfyui_version", lambda: "9.9.9")
    with caplog.at_level(logging.WARNING, logger="comfyui_eligen"):
        assert host.startup_report(logging.getLogger("comfyui_eligen")) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "comfyui_eligen"]
    assert len(lines) == 1 and "9.9.9 is newer than the newest tested version" in lines[0], lines
    host.require_all()  # nodes run


@pytest.mark.compat
def test_startup_report_logs_one_line_at_most(caplog):
    """A tested version logs nothing; a ComfyUI lacking a capability logs one error line naming it."""
    with caplog.at_level(logging.INFO, logger="comfyui_eligen"):
        problems = host.startup_report(logging.getLogger("comfyui_eligen"))
    lines = [r.getMessage() for r in caplog.records if r.name == "comfyui_eligen"]
    if problems:
        assert len(lines) == 1 and all(p.contact in lines[0] for p in problems), lines
    elif host.comfyui_version() in host.TESTED_VERSIONS:
        assert lines == []


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_place_training_blocks_match_the_stock_blocks(family):
    """core/blocks.py re-implements the FLUX blocks from their layers (img_mod, img_attn.qkv, linear1, ...):
    the same output as ComfyUI's own blocks, or the block structure changed."""
    from comfyui_eligen.core import blocks

    model = FAMILIES[family]()
    adapter = adapter_for(model)
    options = blocks.training_transformer_options(model.model.diffusion_model, adapter.training_blocks, {},
                                                  checkpointing=False)
    with contact(f"{adapter.display_name} block structure (core/blocks.py out-of-place blocks)"):
        torch.testing.assert_close(run_forward(model, options), run_forward(model), rtol=1e-4, atol=1e-5)


def test_runtime_checks_name_their_contact_point():
    """Layouts and arguments checked while the model runs fail with MissingCapability, not IndexError."""
    with pytest.raises(host.MissingCapability, match=r"Qwen-Image pe layout: pe has shape \[1, 4, 4, 8, 2, 2\]"):
        host.models.rope_sequence_axis(torch.zeros(1, 4, 4, 8, 2, 2))
    assert host.models.rope_sequence_axis(torch.zeros(1, 1, 4, 8, 2, 2)) == 2
    assert host.models.rope_sequence_axis(torch.zeros(1, 4, 1, 8, 2, 2)) == 1
    with pytest.raises(host.MissingCapability, match=r"double_block arguments: .* without pe"):
        host.models.check_block_args("double_block", {"img": 0, "txt": 0, "vec": 0, "transformer_options": {}})
    with pytest.raises(host.MissingCapability, match="original_block"):
        host.models.check_block_args("single_block", {"img": 0, "vec": 0, "pe": 0, "transformer_options": {}}, {})

    class Backup:
        weight = None

    with pytest.raises(host.MissingCapability, match=r"ModelPatcher.backup: backup\['w'\] has no .weight"):
        host.weights.patched_weight_originals(type("Patcher", (), {"backup": {"w": Backup()}})())


# ---- every runtime contact point has its test ---------------------------------------------------------
# Start-up checks run in test_every_startup_check_passes, headless ones in tests/unit/test_run_file.py. Runtime
# contact points check the objects they are given, so each is exercised by a test above: this map says by
# which, and a contact point added to core/host/ without a test here fails the check below.

RUNTIME_TESTS = {
    host.models.unwrap_patcher: test_model_classes_recognise_the_families,
    host.models.flux1_params: test_flux_params_tell_flux1,
    host.models.flux_guidance_embedded: test_flux_guidance_embed_is_read_from_the_params,
    host.models.context_width: test_model_sampling_dtype_and_widths,
    host.models.patch_size: test_model_sampling_dtype_and_widths,
    host.models.diffusion_model_wrappers: test_diffusion_model_wrapper_registers_on_a_patcher,
    host.models.add_diffusion_model_wrapper: test_diffusion_model_wrapper_registers_on_a_patcher,
    host.models.wrapped_diffusion_model: test_forward_argument_indices_point_at_the_arguments,
    host.models.sampling_transformer_options: test_diffusion_model_wrapper_registers_on_a_patcher,
    host.models.with_block_replacements: test_block_replacements_get_their_arguments,
    host.models.check_block_args: test_runtime_checks_name_their_contact_point,
    host.models.block_list: test_flux_block_internals,
    host.models.flux_double_block_parts: test_flux_block_internals,
    host.models.flux_single_block_parts: test_flux_block_internals,
    host.models.rope_sequence_axis: test_qwen_image_pe_layout,
    host.models.model_sampling: test_model_sampling_dtype_and_widths,
    host.models.simple_sigmas: test_node_plumbing,
    host.models.compute_dtype: test_model_sampling_dtype_and_widths,
    host.models.supported_model_config: test_toy_world_contacts,
    host.models.encode_prompt: test_toy_world_contacts,
    host.models.empty_latent: test_toy_world_contacts,
    host.models.sample_latent: test_toy_world_contacts,
    host.attention.with_attention_override: test_entity_attention_end_to_end,
    host.attention.attention_call_arguments: test_entity_attention_end_to_end,
    host.attention.is_quantized_attention: test_quantized_attention_is_recognised,
    host.weights.patched_weight_originals: test_model_patcher_backup_holds_the_originals,
    host.weights.weight_patches: test_model_patcher_backup_holds_the_originals,
    host.weights.apply_lora: test_model_patcher_backup_holds_the_originals,
    host.weights.lora_key_map: test_unmatched_lora_keys_agree_with_the_stock_loader,
    host.memory.alias_inference_tensors: test_load_for_training_and_module_tensor_slots,
    host.memory.wrap_in_patcher: test_toy_world_contacts,
    host.memory.intermediate_device: test_toy_world_contacts,
    host.encoders.text_encoder_module: test_toy_world_contacts,
    host.encoders.clip_identity_parts: test_toy_world_contacts,
    host.encoders.vae_identity_parts: test_toy_world_contacts,
    host.encoders.vae_downscale_ratio: test_toy_world_contacts,
    host.encoders.prompt_weight_segments: test_toy_world_contacts,
    host.encoders.build_clip: test_toy_world_contacts,
    host.encoders.vae_class: test_toy_world_contacts,
    host.encoders.init_pixel_space_vae: test_toy_world_contacts,
    host.encoders.install_vae_first_stage: test_toy_world_contacts,
    host.files.progress_bar: test_node_plumbing,
    host.files.interrupt_check: test_node_plumbing,
    host.files.send_progress_text: test_node_plumbing,
}


def test_every_runtime_contact_point_has_a_test():
    registered = {function: name for name, function in host.RUNTIME_CONTACTS.items()}
    untested = sorted(name for function, name in registered.items() if function not in RUNTIME_TESTS)
    stale = sorted(getattr(f, "__qualname__", str(f)) for f in RUNTIME_TESTS if f not in registered)
    assert not untested and not stale, f"runtime contact points without a test: {untested}; not registered: {stale}"
