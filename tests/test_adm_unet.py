"""Our ADM UNet against the official DDBM / DBIM one (spec dbim.md section 5).

Reference vector ``assets/adm_reference_vector.safetensors`` was produced once, outside this
repository, with the official code: thu-ml/DiffusionBridge at commit
92522733cc602686df77f07a1824bb89f89cda1a, ``ddbm/unet.py`` ``UNetModel`` on the CPU in float32
with image_size 8, in/out channels 3, condition_mode "concat", model_channels 32, channel_mult
(1, 1), num_res_blocks 1, attention_resolutions (1, 2) (downsample factors), num_head_channels 16,
num_classes 10, use_scale_shift_norm and resblock_updown True, dropout 0. All weights were drawn
from a seeded generator (fan-in scaled normals; norms 1 + 0.1 N) and rounded to float16, so the
file stores them as float16 exactly. Inputs x, xT [2, 3, 8, 8] ~ N(0, 1), timesteps (-173.29, 998),
labels (3, 7); ``out_new`` / ``out_legacy`` are the outputs with use_new_attention_order True /
False on the same weights. The metadata entry ``official_layouts_zlib_b64`` holds the official
models' state-dict keys and shapes for the three released presets (instantiated on the meta device).
"""
import base64
import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyui_fast_samplers.samplers.bridges.adm_unet import (
    ADM_CONFIGS, ADMConfig, ADMUNet, build_adm_unet, infer_adm_config, matching_preset, parameter_count,
    squeeze_attention_kernels,
)

VECTOR = Path(__file__).parent / "assets" / "adm_reference_vector.safetensors"
TINY = ADMConfig(8, 32, (1, 1), 1, (1, 2), num_classes=10, num_head_channels=16)


@pytest.fixture(scope="module")
def vector():
    with safe_open(VECTOR, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    weights = {k[4:]: v.float() for k, v in tensors.items() if k.startswith("net.")}
    layouts = json.loads(zlib.decompress(base64.b64decode(meta["official_layouts_zlib_b64"])))
    return weights, tensors, layouts


@pytest.mark.parametrize("name,count", [("e2h", 295_136_451), ("diode", 552_814_083),
                                        ("imagenet_inpaint", 553_838_083)])
def test_parameter_counts_on_meta_device(name, count):
    assert parameter_count(ADM_CONFIGS[name]) == count


@pytest.mark.parametrize("name,keys", [("e2h", 540), ("diode", 566), ("imagenet_inpaint", 567)])
def test_official_layouts_load_strictly(vector, name, keys):
    """Every preset accepts the official key layout with no missing / unexpected keys, with the
    attention kernels as Conv1d (DBIM files) or Conv2d (DDBM files); the config is inferred back."""
    layout = vector[2][name]
    assert len(layout) == keys
    for conv2d in (False, True):
        sd = {k: torch.empty(shape + ([1] if conv2d and k.endswith((".qkv.weight", ".proj_out.weight")) else []),
                             device="meta") for k, shape in layout}
        net = build_adm_unet(ADM_CONFIGS[name], sd)
        assert sum(p.numel() for p in net.parameters()) == parameter_count(ADM_CONFIGS[name])
        inferred = infer_adm_config(sd)
        assert matching_preset(inferred) == name
        assert inferred.attention_order == ADM_CONFIGS[name].attention_order  # label_emb heuristic
    wrong = dict(sd)
    wrong.pop(layout[-1][0])
    with pytest.raises(RuntimeError, match="Missing key"):
        build_adm_unet(ADM_CONFIGS[name], wrong)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_matches_reference_outputs(vector, order):
    weights, t, _ = vector
    net = build_adm_unet(ADMConfig(**{**TINY.to_dict(), "attention_order": order}), weights)
    with torch.no_grad():
        out = net(t["x"], t["t"], xT=t["xT"], y=t["y"])
    torch.testing.assert_close(out, t[f"out_{order}"], rtol=1e-4, atol=1e-5)


def test_conv2d_kernels_and_wrong_order(vector):
    """DDBM's Conv2d attention kernels give the same network; the other attention order does not
    (guards against a wrong preset)."""
    weights, t, _ = vector
    conv2d = {k: (v[..., None] if k.endswith((".qkv.weight", ".proj_out.weight")) else v) for k, v in weights.items()}
    assert squeeze_attention_kernels(conv2d).keys() == weights.keys()
    assert all(torch.equal(squeeze_attention_kernels(conv2d)[k], weights[k]) for k in weights)
    net = build_adm_unet(TINY, conv2d)
    with torch.no_grad():
        out = net(t["x"], t["t"], xT=t["xT"], y=t["y"])
        torch.testing.assert_close(out, t["out_new"], rtol=1e-4, atol=1e-5)
        legacy = build_adm_unet(ADMConfig(**{**TINY.to_dict(), "attention_order": "legacy"}), weights)
        assert (legacy(t["x"], t["t"], xT=t["xT"], y=t["y"]) - t["out_new"]).abs().max() > 0.1


def test_inferred_tiny_config(vector):
    inferred = infer_adm_config(vector[0], num_head_channels=16, image_size=8)
    assert inferred == ADMConfig(**{**TINY.to_dict(), "attention_order": "legacy"})  # label_emb -> legacy guess
    assert matching_preset(inferred) is None


def test_forward_shapes_and_errors():
    net = ADMUNet(ADMConfig(None, 32, (1, 2), 1, (2,), num_head_channels=32)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert net(x, torch.zeros(2), xT=x).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="condition"):
        net(x, torch.zeros(2))
    bad = dict(net.state_dict())
    bad["out.2.weight"] = torch.zeros(3, 64, 3, 3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_adm_unet(net.config, bad)
    with pytest.raises(ValueError, match="Not an ADM"):
        infer_adm_config({"foo": torch.zeros(1)})
