"""Checkpoint loading: official layout loads strictly, bad files fail with useful messages."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="checkpoint tests need the [export] extra (torch)")

from napari_sam2unet.convert.checkpoints import (  # noqa: E402
    load_sam2_trunk,
    load_sam2unet,
    read_checkpoint,
    unwrap,
)
from napari_sam2unet.errors import ModelError  # noqa: E402
from napari_sam2unet.modeling import Sam2Unet, build_sam2unet  # noqa: E402
from napari_sam2unet.modeling.configs import tiny_test_config  # noqa: E402

REFERENCE_KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sam2unet_state_dict_keys.txt"

torch.set_num_threads(2)


def reference_layout() -> dict[str, list[int]]:
    layout = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        name, shape = line.split("\t")
        layout[name] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return layout


@pytest.mark.skipif(not REFERENCE_KEYS.is_file(), reason=f"{REFERENCE_KEYS} not found")
def test_official_layout_loads_strictly_into_large():
    layout = reference_layout()
    assert len(layout) == 1192
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        else:
            state[name] = torch.empty(shape).uniform_(-0.1, 0.1, generator=generator)
    model = load_sam2unet({"state_dict": state}, "large")
    loaded = model.state_dict()
    for name in ("encoder.pos_embed", "encoder.blocks.47.block.mlp.layers.1.weight", "head.bias"):
        assert torch.equal(loaded[name], state[name])
    assert not model.training


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(0)
    return build_sam2unet(tiny_test_config()).state_dict()


@pytest.mark.parametrize("wrap", [None, "model", "state_dict", "module."])
def test_wrapped_state_dicts_load(small_state, wrap, tmp_path):
    if wrap is None:
        data = small_state
    elif wrap == "module.":
        data = {f"module.{k}": v for k, v in small_state.items()}
    else:
        data = {wrap: small_state, "epoch": 3}
    path = tmp_path / "w.pth"
    torch.save(data, path)
    model = load_sam2unet(path, tiny_test_config())
    assert torch.equal(model.state_dict()["head.weight"], small_state["head.weight"])


def test_missing_and_unexpected_keys_are_named(small_state):
    state = dict(small_state)
    del state["rfb2.conv_cat.conv.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError) as info:
        load_sam2unet(state, tiny_test_config())
    message = str(info.value)
    assert "1 missing keys: rfb2.conv_cat.conv.weight" in message
    assert "1 unexpected keys: decoder.extra.weight" in message


def test_shape_mismatch_is_named(small_state):
    state = dict(small_state)
    state["head.weight"] = torch.zeros(2, 16, 1, 1)
    with pytest.raises(ModelError, match=r"head.weight: file \[2, 16, 1, 1\] vs model \[1, 16, 1, 1\]"):
        load_sam2unet(state, tiny_test_config())


def test_wrong_config_suggests_the_right_one():
    state = build_sam2unet("compact_s").state_dict()
    with pytest.raises(ModelError, match="pass --config compact_s"):
        load_sam2unet(state, "compact")


def test_other_architecture_is_refused(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    path = tmp_path / "resnetish.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelError, match="does not look like a SAM2-UNet checkpoint"):
        load_sam2unet(path, tiny_test_config())


def test_truncated_file_is_refused(small_state, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(small_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot be read.*truncated"):
        load_sam2unet(path, tiny_test_config())


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelError, match="not a state dict"):
        read_checkpoint(path)


def sam2_checkpoint(config, sam21: bool = False) -> dict:
    """A fake SAM2 checkpoint: trunk weights under SAM2's names, plus other SAM2 parts."""
    torch.manual_seed(1)
    encoder = Sam2Unet(config).encoder.state_dict()
    model = {}
    for name, value in encoder.items():
        if ".prompt_learn." in name:
            continue  # SAM2 has no adapters
        model["image_encoder.trunk." + name.replace(".block.", ".", 1)] = value
    model["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)
    model["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    if sam21:
        model["no_obj_embed_spatial"] = torch.zeros(1, 64)
    return {"model": model}


def test_trunk_from_sam2_checkpoint(tmp_path):
    config = tiny_test_config()
    data = sam2_checkpoint(config)
    path = tmp_path / "sam2_hiera_test.pt"
    torch.save(data, path)
    model = Sam2Unet(config)
    adapter_before = model.encoder.blocks[0].prompt_learn[0].weight.clone()
    load_sam2_trunk(model, path)
    trunk = data["model"]
    assert torch.equal(
        model.encoder.blocks[2].block.attn.qkv.weight,
        trunk["image_encoder.trunk.blocks.2.attn.qkv.weight"],
    )
    assert torch.equal(model.encoder.pos_embed, trunk["image_encoder.trunk.pos_embed"])
    assert torch.equal(model.encoder.blocks[0].prompt_learn[0].weight, adapter_before)


def test_sam21_is_refused():
    data = sam2_checkpoint(tiny_test_config(), sam21=True)
    with pytest.raises(ModelError, match="SAM2.1"):
        load_sam2_trunk(Sam2Unet(tiny_test_config()), data)
    with pytest.raises(ModelError, match="SAM2.1 checkpoint"):
        load_sam2unet(data, tiny_test_config())


def test_sam2_checkpoint_is_not_a_sam2unet_one():
    with pytest.raises(ModelError, match="load_sam2_trunk"):
        load_sam2unet(sam2_checkpoint(tiny_test_config()), tiny_test_config())


def test_sam2_trunk_of_another_size_is_refused():
    data = sam2_checkpoint(tiny_test_config(embed_dim=24))
    with pytest.raises(ModelError, match=r"shapes differ: pos_embed: file \[1, 24, 7, 7\] vs model \[1, 16, 7, 7\]"):
        load_sam2_trunk(Sam2Unet(tiny_test_config()), data)


def test_unwrap_prefers_nested_state():
    inner = {"a": torch.zeros(1)}
    assert unwrap({"model": inner, "optimizer": {}}) == inner
    assert unwrap(inner) == inner
