"""Contract tests: one per contact point with ComfyUI internals (core/host.py).

When a ComfyUI update changes one of them, the failing test names the contact point, so the break is
found in a minute. The last tests remove a capability (in process, and in a real server through a tiny
custom node loaded before the package) and check that the refusal names it; the ``compat`` tests are
also the selection CI runs on ComfyUI versions outside the tested range.
"""

import contextlib
import logging
import os
import textwrap

import pytest
import torch

import comfy.ldm.flux.math
import comfy.lora
import comfy.sample
from comfy_server import ComfyServer, ServerError
from comfyui_eligen.core import conditioning, host, patch
from comfyui_eligen.core.adapters import adapter_for
from tiny_models import TEXT_WIDTH, tiny_flux, tiny_qwen_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        assert host.is_base_model(model.model)
        assert adapter_for(model).family == family
        assert adapter_for(model.model.diffusion_model).family == family


def test_flux_params_tell_flux1():
    with contact("FluxParams (axes_dim, global_modulation)"):
        assert host.flux1_params(tiny_flux().model.diffusion_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_argument_indices_point_at_the_arguments(family):
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    seen = []

    def wrapper(executor, *args, **kwargs):
        seen.append(args)
        return executor(*args, **kwargs)

    options = {"wrappers": {host.diffusion_model_wrapper_type(): {"probe": [wrapper]}}}
    with contact("diffusion model forward arguments"):
        run_forward(model, options)
        args = seen[0]
        assert args[adapter.CONTEXT_INDEX].shape == (1, 8, TEXT_WIDTH)
        assert isinstance(args[adapter.TRANSFORMER_OPTIONS_INDEX], dict)
        assert args[adapter.REF_LATENTS_INDEX] is None


def test_diffusion_model_wrapper_registers_on_a_patcher():
    with contact("DIFFUSION_MODEL wrapper"):
        model = tiny_flux().clone()
        host.add_diffusion_model_wrapper(model, "probe", patch.EntityWrapper(adapter_for(model), model.model))
        assert len(host.diffusion_model_wrappers(model, "probe")) == 1
        assert host.sampling_transformer_options(model)["wrappers"][host.diffusion_model_wrapper_type()]["probe"]


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
    with contact("FLUX block modulation / single block MLP width"):
        diffusion_model = tiny_flux().model.diffusion_model
        for block in list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks):
            assert host.flux_block_modulated(block)
        for block in diffusion_model.single_blocks:
            assert 3 * block.hidden_size + host.flux_single_mlp_width(block) == block.linear1.out_features


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replacements_get_their_arguments(family):
    model = FAMILIES[family]()
    diffusion_model = model.model.diffusion_model
    adapter = adapter_for(model)
    calls = []

    def make(kind):
        def replacement(args, extra):
            host.check_block_args(kind, args, extra)
            calls.append((kind, args["pe"]))
            return extra["original_block"](args)
        return lambda index, existing: replacement

    options = {}
    for kind, (attribute, _) in adapter.training_blocks.items():
        options = host.with_block_replacements(options, kind, len(getattr(diffusion_model, attribute)), make(kind))
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

    options = host.with_block_replacements({}, "double_block", 1, lambda index, existing: replacement)
    with contact("Qwen-Image pe layout"):
        run_forward(model, options)
        axis = host.rope_sequence_axis(seen[0])
        assert seen[0].shape[axis] == 8 + 4 * 6  # text tokens + image tokens of the 8x12 latent


def test_qwen_image_block_call():
    model = tiny_qwen_image()
    block = model.model.diffusion_model.transformer_blocks[0]
    pe = []
    options = host.with_block_replacements({}, "double_block", 1, lambda i, e: lambda a, x: (pe.append(a), x["original_block"](a))[1])
    run_forward(model, options)
    args = pe[0]
    with contact("Qwen-Image block forward(transformer_options=)"):
        txt, img = host.qwen_image_block(block, args["img"], args["txt"], args["vec"], args["pe"], {})
        assert img.shape == args["img"].shape and txt.shape == args["txt"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_entity_attention_end_to_end(family):
    """Wrapper + override + (Qwen-Image) pe swap together change the output."""
    model = patch.patch_model(FAMILIES[family]())
    options = host.sampling_transformer_options(model)
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
        patched = host.apply_lora(model, lora, 1.0)
        assert key in host.weight_patches(patched) and not host.weight_patches(model)
        patched.patch_model()
        try:
            assert not torch.equal(patched.model.state_dict()[key], original)
            torch.testing.assert_close(host.patched_weight_originals(patched)[key].to(original), original)
        finally:
            patched.unpatch_model()


def test_load_for_training_and_module_tensor_slots():
    model = tiny_flux()
    with contact("model_management.load_models_gpu / module tensor slots"):
        host.load_for_training(model)
        diffusion_model = model.model.diffusion_model
        with torch.inference_mode():
            inference = torch.ones(3)
        diffusion_model.img_in.register_buffer("probe", inference)
        swapped = host.alias_inference_tensors(diffusion_model)
        assert not diffusion_model.img_in.probe.is_inference()
        host.restore_tensors(swapped)
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
    key_map = host.lora_key_map(model)
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
        assert host.lora_unmatched_keys(state_dict, key_map) == [k for k in state_dict if k in dropped]


def test_node_plumbing():
    model = tiny_flux()
    with contact("samplers.calculate_sigmas / utils.ProgressBar / interrupt check / conds.CONDRegular"):
        sigmas = host.simple_sigmas(model.get_model_object("model_sampling"), 4)
        assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
        bar = host.progress_bar(3)
        bar.update_absolute(1, 3)
        host.interrupt_check()()
        assert issubclass(conditioning.EntityCondition, host.regular_cond_class())


def test_toy_world_contacts():
    with contact("toy world and cache keys: supported_models, ModelPatcher, sd.CLIP, sd.VAE, V1 nodes, sample"):
        from comfyui_eligen.toyworld import models

        assert host.prompt_weight_segments("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
        model, clip, vae = models.load_toy_models("flux", weights="random")
        positive = host.encode_prompt(clip, "red circle")
        latent = host.empty_latent(model, 32, 32)
        samples = host.sample_latent(model, latent, 0, 1, 1.0, "euler", "simple", positive, positive)
        assert samples.shape == latent.shape and isinstance(vae, host.vae_class())
        assert isinstance(host.vae_identity_parts(vae)[0], torch.nn.Module)
        assert isinstance(host.clip_identity_parts(clip)[0], torch.nn.Module)


# ---- a capability removed -------------------------------------------------------------------------

def _attention_without_options(q, k, v, pe, mask=None):  # the 0.3.52 signature
    return ORIGINAL_FLUX_ATTENTION(q, k, v, pe=pe, mask=mask)


ORIGINAL_FLUX_ATTENTION = comfy.ldm.flux.math.attention
REMOVED = "comfy.ldm.flux.math.attention(transformer_options=)"


def test_a_removed_capability_is_named_in_process(monkeypatch):
    monkeypatch.setattr(comfy.ldm.flux.math, "attention", _attention_without_options)
    host._flux_attention_function.cache_clear()
    try:
        assert any(p.contact == REMOVED for p in host.missing_capabilities())
        with pytest.raises(host.MissingCapability, match=r"ComfyUI .*" + REMOVED.replace("(", r"\(").replace(")", r"\)")):
            patch.patch_model(tiny_flux())
    finally:
        monkeypatch.undo()
        host._flux_attention_function.cache_clear()


APPLY_GRAPH = {
    "models": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
    "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": "a red circle"}},
    "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
    "entity": {"class_type": "EliGenEntity", "inputs": {"mask": ["mask", 0], "clip": ["models", 1],
                                                         "text": "red circle", "text_length": "real_length"}},
    "apply": {"class_type": "EliGenApply", "inputs": {"model": ["models", 0], "positive": ["text", 0],
                                                       "entities": ["entity", 0], "entities_on_negative": False}},
    "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "sample": {"class_type": "KSampler", "inputs": {
        "model": ["apply", 0], "positive": ["apply", 1], "negative": ["apply", 2], "latent_image": ["latent", 0],
        "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
    "image": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["models", 2]}},
    "save": {"class_type": "SaveImage", "inputs": {"images": ["image", 0], "filename_prefix": "refusal"}},
}


def assert_refused(server, contacts):
    """The start-up line names the version and every contact; EliGen Apply fails naming the first."""
    version = host.comfyui_version()
    lines = [line for line in server.log_text().splitlines() if "EliGen: ComfyUI" in line]
    assert len(lines) == 1 and f"ComfyUI {version} is not supported" in lines[0], server.log_tail(40)
    assert all(name in lines[0] for name in contacts), lines[0]
    with pytest.raises(ServerError) as failure:
        server.run_workflow(APPLY_GRAPH, timeout=120)
    message = str(failure.value).split("\n")[0]
    # EliGen Apply refuses; on ComfyUI versions without the toy VAE's entry point the toy loader refuses first.
    assert "MissingCapability" in message and f"ComfyUI {version}" in message, message
    assert ("(EliGenApply)" in message and contacts[0] in message) or (
        "(EliGenToyModelLoader)" in message and "pixel_space_vae" in message), message


@pytest.mark.server
@pytest.mark.compat
def test_startup_line_and_node_error_match_this_comfyui(comfy_server):
    """On a supported ComfyUI: no refusal line and EliGen Apply samples. Outside the range (e.g. 0.3.52):
    one start-up line naming the version and what is missing, and EliGen Apply fails with it."""
    problems = host.missing_capabilities()
    if problems:
        assert_refused(comfy_server, [p.contact for p in problems])
    else:
        assert "is not supported" not in comfy_server.log_text()
        assert comfy_server.output_files(comfy_server.run_workflow(APPLY_GRAPH, timeout=120))


BREAKER = textwrap.dedent('''
    """Loads ComfyUI-EliGen after removing one ComfyUI capability (the FLUX attention function loses its
    transformer_options argument, as in ComfyUI 0.3.52)."""
    import importlib.util, os, sys
    import comfy.ldm.flux.math as flux_math

    _original = flux_math.attention

    def attention(q, k, v, pe, mask=None):
        return _original(q, k, v, pe=pe, mask=mask)

    flux_math.attention = attention
    _spec = importlib.util.spec_from_file_location("comfyui_eligen", os.path.join({repo!r}, "__init__.py"),
                                                   submodule_search_locations=[{repo!r}])
    _package = importlib.util.module_from_spec(_spec)
    sys.modules["comfyui_eligen"] = _package
    _spec.loader.exec_module(_package)
    comfy_entrypoint = _package.comfy_entrypoint
''')


@pytest.mark.server
@pytest.mark.compat
def test_a_server_with_a_removed_capability_names_it(tmp_path):
    breaker = tmp_path / "eligen_with_a_capability_removed"
    breaker.mkdir()
    (breaker / "__init__.py").write_text(BREAKER.format(repo=REPO))
    server = ComfyServer(custom_nodes={breaker.name: str(breaker)}, log_path=str(tmp_path / "server.log"),
                         torch_threads=1)
    try:
        server.start()
        # On a supported ComfyUI the removed capability is the only one missing; outside the range it is
        # among those this ComfyUI lacks anyway.
        assert_refused(server, [p.contact for p in host.missing_capabilities()] or [REMOVED])
    finally:
        server.stop()


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
        host.rope_sequence_axis(torch.zeros(1, 4, 4, 8, 2, 2))
    assert host.rope_sequence_axis(torch.zeros(1, 1, 4, 8, 2, 2)) == 2
    assert host.rope_sequence_axis(torch.zeros(1, 4, 1, 8, 2, 2)) == 1
    with pytest.raises(host.MissingCapability, match=r"double_block arguments: .* without pe"):
        host.check_block_args("double_block", {"img": 0, "txt": 0, "vec": 0, "transformer_options": {}})
    with pytest.raises(host.MissingCapability, match="original_block"):
        host.check_block_args("single_block", {"img": 0, "vec": 0, "pe": 0, "transformer_options": {}}, {})

    class Backup:
        weight = None

    with pytest.raises(host.MissingCapability, match=r"ModelPatcher.backup: backup\['w'\] has no .weight"):
        host.patched_weight_originals(type("Patcher", (), {"backup": {"w": Backup()}})())
