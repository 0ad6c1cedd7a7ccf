"""A user's ComfyUI environment, built for tests/server/test_user_install.py: a new venv that holds ComfyUI's own
requirements and nothing of this project (no peft, no test tools), as the portable and desktop builds do.

Installing torch again (~5 GB of CUDA wheels) would take most of a CI run on 2 cores, so the torch family
(torch, torchvision, torchaudio when present, and what they pull: triton, the nvidia and cuda libraries,
sympy, networkx, ...) is shared from the project venv: an overlay folder holds links to exactly those
distributions' files, and a ``.pth`` file puts it on the new venv's path. This is still a faithful user's
environment: a user's torch is also there before any node pack is installed; pip sees the shared
distributions as installed (with their metadata) and never replaces them (a constraints file pins them,
so a requirement that wanted another torch would fail the build, not download one); everything else
ComfyUI's requirements.txt lists is installed by pip into the new venv from pip's cache or the package
index, as a user's install does, so a dependency this package forgets is missing here. What ComfyUI
lists and the torch family also pulls (numpy, pillow) is not shared: pip installs it.

    env = build(folder, comfyui_dir)   # env.python, env.seconds, env.log
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath

TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
OVERLAY_PTH = "shared_torch_family.pth"
VENV_OWN = {"pip", "setuptools", "wheel"}  # a new venv has its own; pip upgrades them there if torch asks
# What ComfyUI imports without listing it: 0.3.75 imports requests at start-up (app/frontend_management.py).
# Every real install has it (the portable and desktop builds ship it; comfy-cli depends on it).
UNLISTED = ("requests",)


class BuildError(RuntimeError):
    """The user's environment could not be built; the message says which step and shows its output."""


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line):
    """The distribution a requirements.txt line names (None for blank and comment lines)."""
    line = line.split("#", 1)[0].strip()
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return canonical(found.group(0)) if found else None


def torch_family(exclude):
    """{canonical name: Distribution} of the torch family installed here: torch, torchvision, torchaudio
    (those present) and, recursively, what they require in this Python, except the names in ``exclude``
    (ComfyUI's own requirements: pip installs those)."""
    from packaging.requirements import Requirement

    found, todo = {}, [(name, ()) for name in TORCH_FAMILY if _installed(name)]
    if ("torch", ()) not in todo:
        raise BuildError(f"the project venv ({sys.prefix}) has no torch to share")
    done = set()
    while todo:
        name, extras = todo.pop()
        name = canonical(name)
        if (name, extras) in done or name in exclude:
            continue
        done.add((name, extras))
        dist = found.setdefault(name, importlib.metadata.distribution(name))
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("",) + extras):
                todo.append((requirement.name, tuple(sorted(requirement.extras))))
    return found


def _installed(name):
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _record(dist):
    """The site-packages paths a distribution installed (from its RECORD), as tuples of parts."""
    if dist.files is None:
        raise BuildError(f"{dist.metadata['Name']} has no RECORD: cannot tell which files are its own")
    for path in dist.files:
        parts = PurePosixPath(str(path)).parts
        if parts and parts[0] != ".." and parts[0] != "__pycache__":  # scripts in bin/; shared bytecode
            yield parts


def link_overlay(overlay, site, family):
    """Links in ``overlay`` to the files of ``family`` in ``site``: a top-level folder or file when only
    the family owns it, else (a namespace folder such as ``nvidia/`` shared with other distributions)
    its entries one level down. Returns the linked paths."""
    owners = defaultdict(set)
    for dist in importlib.metadata.distributions(path=[site]):
        name = canonical(dist.metadata["Name"])  # read once: each .metadata parses the file again
        for parts in _record(dist):
            for depth in (1, 2):
                owners[parts[:depth]].add(name)
    wanted, links = set(family), set()
    for name, dist in family.items():
        for parts in _record(dist):
            if owners[parts[:1]] <= wanted:
                links.add(parts[:1])
            elif len(parts) > 1 and owners[parts[:2]] <= wanted:
                links.add(parts[:2])
            else:
                shared = "/".join(parts[:2])
                raise BuildError(f"{shared} belongs to {name} and to {sorted(owners[parts[:2]] - wanted)} too")
    for parts in sorted(links):
        target = os.path.join(overlay, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.path.join(site, *parts), target)
    return sorted("/".join(parts) for parts in links)


@dataclass
class UserEnvironment:
    python: str                     # the venv's interpreter: runs ComfyUI and pip
    folder: str
    shared: dict                    # {distribution: version} taken from the project venv
    seconds: dict = field(default_factory=dict)   # per step
    log: str = ""                   # pip's output

    def pip(self, *args, timeout=1800):
        """``python -m pip ARGS`` in the user's venv; BuildError with its output when it fails."""
        done = subprocess.run([self.python, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                              env=clean_env(), stdin=subprocess.DEVNULL)
        self.log += f"$ pip {' '.join(args)}\n{done.stdout}{done.stderr}"
        if done.returncode != 0:
            raise BuildError(f"pip {' '.join(args)} failed (exit {done.returncode}):\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")
        return done.stdout

    def version(self, name):
        """The version of ``name`` installed in the user's venv, None when absent."""
        done = subprocess.run([self.python, "-c", "import sys, importlib.metadata as m\ntry: print(m.version(sys.argv[1]))\n"
                               "except m.PackageNotFoundError: pass", name], capture_output=True, text=True,
                              env=clean_env(), timeout=120)
        if done.returncode != 0:
            raise BuildError(f"cannot ask the user's venv for {name}: {done.stderr[-2000:]}")
        return done.stdout.strip() or None


def clean_env(**extra):
    """The environment for the user's Python: nothing that points it at the project venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(DO_NOT_TRACK="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def build(folder, comfyui_dir):
    """The user's venv in ``folder``: created with the project venv's base Python (``python -m venv
    --upgrade-deps``: the current pip), the torch family shared through the overlay, ComfyUI's
    requirements.txt (torch family lines aside) installed by pip without compiling their bytecode (Python
    compiles what ComfyUI imports when it starts)."""
    seconds, started = {}, time.monotonic()
    venv = os.path.join(folder, "venv")
    base_python = getattr(sys, "_base_executable", sys.executable)
    # --upgrade-deps: the current pip, as users are told to run; the venv's bundled pip (23.2) spends most of
    # the build checking each of ~90,000 index links against ~1,000 wheel tags one by one
    done = subprocess.run([base_python, "-m", "venv", "--upgrade-deps", venv], capture_output=True, text=True,
                          timeout=600, env=clean_env())
    if done.returncode != 0:
        raise BuildError(f"python -m venv failed: {done.stderr[-2000:]}")
    python = os.path.join(venv, "bin", "python")
    seconds["venv"] = time.monotonic() - started

    step = time.monotonic()
    with open(os.path.join(comfyui_dir, "requirements.txt")) as handle:
        lines = handle.read().splitlines()
    comfy_names = {requirement_name(line) for line in lines} - {None}
    family = torch_family(exclude=(comfy_names - set(TORCH_FAMILY)) | VENV_OWN)
    site = sysconfig.get_paths()["purelib"]
    overlay = os.path.join(folder, "torch-family")
    link_overlay(overlay, site, family)
    user_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    with open(os.path.join(user_site, OVERLAY_PTH), "w") as handle:
        handle.write(overlay + "\n")
    shared = {name: dist.version for name, dist in sorted(family.items())}
    seconds["overlay"] = time.monotonic() - step

    env = UserEnvironment(python, folder, shared, seconds)
    step = time.monotonic()
    requirements = os.path.join(folder, "comfyui-requirements.txt")
    with open(requirements, "w") as handle:
        kept = [line for line in lines if requirement_name(line) not in TORCH_FAMILY]
        handle.write("\n".join(kept + list(UNLISTED)) + "\n")
    constraints = os.path.join(folder, "shared-constraints.txt")
    with open(constraints, "w") as handle:
        handle.write("".join(f"{name}=={version}\n" for name, version in shared.items()))
    # --no-compile: ComfyUI's own requirements only (~7,800 modules, most never imported); the package's
    # requirements.txt is installed the user's way, bytecode and all (install_requirements in the test)
    env.pip("install", "--no-compile", "-r", requirements, "-c", constraints)
    seconds["pip"] = time.monotonic() - step
    seconds["total"] = time.monotonic() - started
    return env
