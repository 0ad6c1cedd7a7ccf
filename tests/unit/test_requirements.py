"""requirements.txt, the only file ComfyUI-Manager and comfy-cli read, lists the same runtime dependencies as
pyproject.toml, never torch, and the peft the code checks for."""

import os
import re
import tomllib

from comfyui_eligen.training import peft_requirement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def normalized(requirement):
    """``Pillow >= 10`` -> ``pillow>=10`` (names compare case- and separator-insensitively, as pip does)."""
    name, spec = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec.replace(" ", "")


def requirements_txt():
    with open(os.path.join(REPO, "requirements.txt")) as handle:
        return [normalized(line) for line in handle if line.strip() and not line.lstrip().startswith("#")]


def pyproject_dependencies():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        return [normalized(d) for d in tomllib.load(handle)["project"]["dependencies"]]


def test_requirements_txt_lists_the_pyproject_dependencies():
    listed = requirements_txt()
    assert listed, "requirements.txt lists nothing"
    assert sorted(listed) == sorted(pyproject_dependencies())
    assert len(set(listed)) == len(listed), f"listed twice: {listed}"


def test_no_torch_in_either_list():
    for found in (requirements_txt(), pyproject_dependencies()):
        names = {re.match(r"[a-z0-9-]+", requirement).group(0) for requirement in found}
        assert not names & TORCH_FAMILY, f"torch must come from ComfyUI's environment, not from here: {found}"


def test_the_code_checks_for_the_listed_peft():
    assert normalized(peft_requirement.REQUIREMENT) in requirements_txt()
    minimum = peft_requirement.REQUIREMENT.partition(">=")[2]
    assert peft_requirement.MINIMUM == tuple(int(part) for part in minimum.split("."))
