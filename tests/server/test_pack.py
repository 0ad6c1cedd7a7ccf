"""Registry readiness: `comfy node validate` is clean and `comfy node pack` (comfy-cli, as `comfy node
publish` packs) gives an archive with what ComfyUI needs and the toy weights, without tests, benchmarks,
the measurement lab, CI or docs images, and nothing in it imports the lab. Both run on a copy of the repository's files (tracked or not ignored), so nothing is
written into the checkout."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEFT_OUT = ("tests/", "bench/", "lab/", "docs/", ".ci/")
LAB_IMPORT = re.compile(r"^\s*(from\s+(\.+|comfyui_eligen\.)lab\b|import\s+comfyui_eligen\.lab\b)", re.MULTILINE)


def comfy_cli():
    path = os.path.join(os.path.dirname(sys.executable), "comfy")
    path = path if os.path.exists(path) else shutil.which("comfy")
    if path is None:
        pytest.fail("comfy-cli is not installed: pip install -e '.[test]' (it is in the test extra)", pytrace=False)
    return path


def repo_files():
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(name for name in listed if os.path.isfile(os.path.join(REPO, name)))


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """The repository's files in a fresh git repository (comfy-cli packs git-tracked files)."""
    folder = tmp_path_factory.mktemp("pack") / "ComfyUI-EliGen"
    for name in repo_files():
        os.makedirs(folder / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(REPO, name), folder / name)
    for command in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    return folder


def run_comfy(folder, *args):
    result = subprocess.run([comfy_cli(), *args], cwd=folder, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"comfy {' '.join(args)} failed:\n{output}"
    return output


def test_comfy_node_validate_is_clean(copy):
    output = run_comfy(copy, "node", "validate")
    assert "All validation checks passed" in output, output
    assert "warning" not in output.lower(), output


def test_comfy_node_pack_contents(copy):
    run_comfy(copy, "node", "pack")
    with zipfile.ZipFile(copy / "node.zip") as archive:
        names = set(archive.namelist())
        infos = {info.filename: info for info in archive.infolist()}
    left_out = sorted(n for n in names if n.startswith(LEFT_OUT))
    assert not left_out, f"tests, benchmarks, the lab, CI or docs in the archive: {left_out[:10]}"
    assert any(n.startswith("lab/") for n in repo_files()), "the lab is gone from the repository: nothing checked"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # everything ComfyUI imports or the users open is there
    wanted = [n for n in repo_files() if not n.startswith(LEFT_OUT)
              and (n.endswith(".py") or n.startswith(("example_workflows/", "web/")))]
    assert wanted and not sorted(set(wanted) - names), sorted(set(wanted) - names)
    # the package runs without the lab: no module in the archive imports it
    with zipfile.ZipFile(copy / "node.zip") as archive:
        importing = [n for n in names if n.endswith(".py") and LAB_IMPORT.search(archive.read(n).decode("utf-8"))]
    assert not importing, f"archive modules import the lab, which the archive leaves out: {importing}"
    assert {"__init__.py", "pyproject.toml", "README.md", "requirements.txt"} <= names  # what comfy node install reads
    # the toy weights, byte for byte (so the toy world works from a registry install)
    weights = [n for n in repo_files() if n.startswith("toyworld/weights/") and n.endswith(".safetensors")]
    assert len(weights) == 2
    for name in weights:
        with open(os.path.join(REPO, name), "rb") as f:
            assert zipfile.crc32(f.read()) == infos[name].CRC, f"{name} differs in the archive"
    # the page extension (WEB_DIRECTORY) that refreshes LoRA lists and orders the template cards
    assert "web/eligen.js" in names
    # the only images are the example inputs and the template thumbnails (no docs figures)
    images = sorted(n for n in names if n.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".webp")))
    thumbnails = [n for n in images if re.fullmatch(r"example_workflows/[^/]+\.jpg", n)]
    assert {n[:-4] for n in thumbnails} == {n[:-5] for n in names if re.fullmatch(r"example_workflows/[^/]+\.json", n)}
    assert all(n.startswith("example_workflows/inputs/") for n in sorted(set(images) - set(thumbnails))), images


def test_registry_fields_are_complete():
    import tomlkit  # comes with comfy-cli (test extra); tomllib needs Python 3.11

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        project = tomlkit.parse(f.read())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # the icon URL names a file of this repository (the registry loads it from the default branch)
    repository = project["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert comfy["Icon"].startswith(prefix)
    from PIL import Image

    with Image.open(os.path.join(REPO, comfy["Icon"][len(prefix):])) as icon:
        assert icon.size[0] == icon.size[1] <= 400
