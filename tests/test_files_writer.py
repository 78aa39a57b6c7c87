"""samplers/files.py, the one writer: atomic, never over an existing file unless asked, no temp files left."""
import os

import pytest
import torch
from safetensors.torch import load_file

from comfyui_fast_samplers.samplers import files
from comfyui_fast_samplers.samplers.files import atomic_save_safetensors


def test_writes_never_overwrites_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "a.safetensors"
    atomic_save_safetensors({"x": torch.arange(3.0)}, path, metadata={"k": "v"})
    with pytest.raises(FileExistsError, match="already exists; it was left untouched"):
        atomic_save_safetensors({"x": torch.zeros(3)}, path)
    assert torch.equal(load_file(path)["x"], torch.arange(3.0))
    atomic_save_safetensors({"x": torch.ones(3)}, path, overwrite=True)
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    assert os.listdir(path.parent) == ["a.safetensors"]


@pytest.mark.parametrize("link_error", [OSError, FileExistsError])
def test_a_file_that_appears_while_writing_is_kept(tmp_path, monkeypatch, link_error):
    """OSError: a file system without hard links (the rename fallback must re-check); FileExistsError: the
    link itself found the file."""
    path = tmp_path / "b.safetensors"

    def link(src, dst):  # someone else writes the target between the first check and the rename
        path.write_bytes(b"theirs")
        raise link_error("link")

    monkeypatch.setattr(files.os, "link", link)
    with pytest.raises(FileExistsError, match="appeared while writing; it was left untouched"):
        atomic_save_safetensors({"x": torch.zeros(2)}, path)
    assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["b.safetensors"]


def test_text_writer_replaces_whole_files_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    import os

    from comfyui_fast_samplers.samplers.files import atomic_write_text

    path = tmp_path / "sub" / "results.md"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in path.parent.iterdir()) == ["results.md"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "half\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in path.parent.iterdir()) == ["results.md"]


def test_free_path_keeps_a_free_name_and_never_returns_a_taken_one(tmp_path):
    from comfyui_fast_samplers.samplers.files import free_path

    target = tmp_path / "plot.png"
    assert free_path(target) == target
    target.write_bytes(b"a")
    (tmp_path / "plot-1.png").write_bytes(b"b")
    assert free_path(target) == tmp_path / "plot-2.png"
