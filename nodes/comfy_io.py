"""The single place the pack imports ComfyUI's node API from (swap to a pinned version here)."""
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

PREFIX = "FS"  # node ids: FS_<Name>; sampler names: fs_<name>; category: sampling/fs/<method>
CATEGORY = "sampling/fs"
