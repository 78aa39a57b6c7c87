"""Every file the pack writes goes through here, atomically and never over a user's file: safetensors for tensors, text for
the benchmarks' results and caches."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None,
                            overwrite: bool = False) -> Path:
    """Write to a temp file in the target folder, then rename. An existing file is kept (FileExistsError)
    unless ``overwrite`` (only for the pack's own cache / checkpoint files)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; it was left untouched (choose another name).")
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        if overwrite:
            os.replace(tmp, path)
        else:  # link + unlink: fails instead of replacing a file that appeared meanwhile
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while writing; it was left untouched.") from None
            except OSError:  # a file system without hard links: a last check, then rename
                if path.exists():
                    raise FileExistsError(f"{path} appeared while writing; it was left untouched.") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Replace the text file ``path`` (the pack's own results and caches) by way of a temp file in its folder:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def free_path(path) -> Path:
    """``path`` if no file is there, else the first free ``stem-1.suffix``, ``stem-2.suffix``... (a name the
    user chose: it is kept where it can be)."""
    path = Path(path)
    candidate, k = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def unused_path(folder, prefix: str, suffix: str = ".safetensors") -> Path:
    """``folder/prefix_00001.safetensors``, the first number not yet taken (ComfyUI's save-prefix style)."""
    folder = Path(folder)
    n = 1
    while (folder / f"{prefix}_{n:05d}{suffix}").exists():
        n += 1
    return folder / f"{prefix}_{n:05d}{suffix}"
