"""Without peft (or with one older than the minimum) nothing but training needs it: the node modules load
without importing it, the start-up log gets one line, and training stops before any work with a message
naming what is missing and the command that installs it. (tests/server/test_user_install.py runs a real
ComfyUI in a venv without peft.)"""

import logging
import os
import subprocess
import sys

import pytest

from comfyui_eligen.training import lora, peft_requirement, runner
from comfyui_eligen.training.peft_requirement import PeftUnavailable

from comfy_server import REPO, expected_node_ids, find_comfyui_dir
from tiny_models import tiny_flux


USER_PYTHON = os.path.join("ComfyUI", "venv", "bin", "python")  # any Python that runs a user's ComfyUI


def test_the_message_names_what_is_missing_and_the_command():
    missing = peft_requirement.problem(None, python=USER_PYTHON)
    assert f"{USER_PYTHON}) has no peft" in missing
    assert f'Install it with: {USER_PYTHON} -m pip install "peft>=0.13" and restart ComfyUI' in missing
    old = peft_requirement.problem("0.12.0", python=USER_PYTHON)
    assert "has peft 0.12.0" in old and f'{USER_PYTHON} -m pip install "peft>=0.13"' in old
    spaced = peft_requirement.problem(None, python=r"C:\ComfyUI portable\python_embeded\python.exe")
    assert r'"C:\ComfyUI portable\python_embeded\python.exe" -m pip install' in spaced


@pytest.mark.parametrize("version, enough", [("0.12.9", False), ("0.13.0", True), ("0.13", True),
                                             ("0.14.0.dev0", True), ("1.0.0", True), ("0.9.0", False)])
def test_versions_against_the_minimum(version, enough):
    assert (peft_requirement.problem(version) is None) == enough


def test_the_default_command_is_for_the_running_python():
    assert peft_requirement.install_command() == f'{sys.executable} -m pip install "peft>=0.13"'


@pytest.fixture
def old_peft(monkeypatch):
    """This process's peft looks like 0.12.0 to the check (the installed one is newer)."""
    monkeypatch.setattr(peft_requirement, "installed_version", lambda: "0.12.0")


def test_training_stops_before_any_work(old_peft):
    # no job, no inputs, no folders: the check is the first thing a run does
    with pytest.raises(PeftUnavailable, match=r'has peft 0\.12\.0\. Install it with: .* -m pip install "peft>=0\.13"'):
        runner.run_job(None, None, None)


def test_lora_injection_needs_peft_and_leaves_the_model_as_it_was(old_peft):
    from comfyui_eligen.core.adapters import adapter_for

    base = tiny_flux(seed=0, depth=1, single_depth=1)
    diffusion_model = base.model.diffusion_model
    before = [name for name, _ in diffusion_model.named_modules()]
    with pytest.raises(PeftUnavailable):
        lora.inject(diffusion_model, lora.LoraSettings(rank=2), adapter_for(base))
    assert [name for name, _ in diffusion_model.named_modules()] == before


def test_the_start_up_line(old_peft, caplog):
    log = logging.getLogger("comfyui_eligen")
    with caplog.at_level(logging.WARNING, logger="comfyui_eligen"):
        text = peft_requirement.startup_report(log)
    assert [r.getMessage() for r in caplog.records] == [f"EliGen: EliGen Train LoRA will not run: {text}"]
    assert "has peft 0.12.0" in text


def test_no_start_up_line_with_a_recent_peft(caplog):
    assert peft_requirement.problem(peft_requirement.installed_version()) is None, "the test venv needs peft>=0.13"
    with caplog.at_level(logging.WARNING, logger="comfyui_eligen"):
        assert peft_requirement.startup_report(logging.getLogger("comfyui_eligen")) is None
    assert not caplog.records


# Loads the package as ComfyUI does (its folder name as the module name, here a git clone's), asks for the
# node list, runs EliGen LoRA Config, and says whether peft got imported on the way.
_LOAD_NODES = r"""
import asyncio, importlib.util, os, sys
comfy_dir, repo = sys.argv[1:3]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True
name = os.path.join(os.path.dirname(repo), "ComfyUI-EliGen")
spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "__init__.py"), submodule_search_locations=[repo])
package = importlib.util.module_from_spec(spec)
sys.modules[name] = package
spec.loader.exec_module(package)
nodes = asyncio.run(asyncio.run(package.comfy_entrypoint()).get_node_list())
config = next(n for n in nodes if n.define_schema().node_id == "EliGenLoraConfig")
config.execute(rank=4, alpha=4.0, dropout=0.0, init="kaiming", preset="eligen", dtype="float32")
print("nodes", len(nodes), "peft imported", "peft" in sys.modules)
"""


def test_the_nodes_load_without_importing_peft():
    comfy_dir = find_comfyui_dir()
    done = subprocess.run([sys.executable, "-c", _LOAD_NODES, comfy_dir, REPO], capture_output=True, text=True,
                          timeout=300, cwd=comfy_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("nodes ") and last.endswith("peft imported False"), done.stdout[-2000:]
    assert int(last.split()[1]) == len(expected_node_ids())
