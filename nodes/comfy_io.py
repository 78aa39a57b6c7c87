"""The single place the pack imports ComfyUI's node API from (swap to a pinned version here)."""
from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401

PREFIX = "FS"  # node ids: FS_<Name>; sampler names: fs_<name>; category: sampling/fs/<method>
CATEGORY = "sampling/fs"


def mark_advanced(inputs: list, *ids: str) -> list:
    """Marks the named inputs as expert or compatibility switches. Front ends that know the flag (1.58 and
    newer) fold them away behind "show advanced inputs"; older ones show them as before. Ids, values and
    the widget order stay the same, so saved workflows load unchanged."""
    unknown = set(ids) - {i.id for i in inputs}
    if unknown:
        raise ValueError(f"mark_advanced: no inputs named {sorted(unknown)}")
    for widget in inputs:
        if widget.id in ids:
            widget.extra_dict = {**widget.extra_dict, "advanced": True}
    return inputs
