"""ComfyUI versions as a real server meets them: on a tested version EliGen Apply samples and the log has
no refusal; outside the range (or with a capability removed by a tiny custom node loaded before the
package) one start-up line names the version and what is missing, and EliGen Apply fails naming it.
These are ``compat`` tests: CI runs them on ComfyUI versions outside the tested range too."""

import os
import textwrap

import pytest

from comfy_server import ComfyServer, ServerError
from comfyui_eligen.core import host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOVED = "comfy.ldm.flux.math.attention(transformer_options=)"  # what the custom node below removes


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
