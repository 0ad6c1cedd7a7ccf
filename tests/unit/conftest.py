"""Fixtures the in-process tests share (the session-wide ones are in tests/conftest.py)."""

import pytest


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """ComfyUI's output and loras folders pointed at a temp dir (the ComfyUI copy is never written)."""
    import folder_paths  # ComfyUI's, on sys.path once tests/conftest.py has run

    output, loras = tmp_path / "output", tmp_path / "loras"
    output.mkdir()
    loras.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(loras)], folder_paths.supported_pt_extensions))
    return output, loras
