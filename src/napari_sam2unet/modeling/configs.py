"""SAM2-UNet configurations: the official Hiera sizes and compact ones for the bundled model.

The Hiera settings of `large`, `base_plus`, `small` and `tiny` are SAM2's published ones
(sam2_hiera_*.yaml); the decoder is SAM2-UNet's (RFB to 64 channels, U-Net, three heads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sam2UnetConfig:
    """Everything that fixes the shapes of a SAM2-UNet; weights come from a checkpoint."""

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    # SAM2 calls this window_pos_embed_bkg_spatial_size: the learned background embedding,
    # resized bicubically to the token grid.
    pos_embed_size: tuple[int, int] = (7, 7)
    patch_kernel: int = 7
    patch_stride: int = 4
    patch_padding: int = 3
    q_pool: int = 3  # how many stage transitions halve the grid
    mlp_ratio: float = 4.0
    adapter_dim: int = 32
    rfb_channels: int = 64
    unused_up4: bool = True  # the official weights carry an `up4` that forward never calls
    sam2_trunk: str | None = None  # the SAM2 checkpoint whose trunk fits this config
    # Compact models compute at this side and resize their input to it (and their logits back):
    # a model trained on small crops keeps the scale it learnt under the 352 contract.
    work_size: int | None = None

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of the four feature maps the trunk returns (width doubles per stage)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.stages)))


def _sam2_size(name: str, **shape) -> Sam2UnetConfig:
    """One of SAM2's published Hiera sizes, with the SAM2 checkpoint its trunk comes from."""
    return Sam2UnetConfig(name=name, sam2_trunk=f"sam2_hiera_{name}.pt", **shape)


CONFIGS: dict[str, Sam2UnetConfig] = {
    config.name: config
    for config in (
        _sam2_size("large", embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                   window_spec=(8, 4, 16, 8), pos_embed_size=(7, 7)),
        _sam2_size("base_plus", embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                   window_spec=(8, 4, 14, 7), pos_embed_size=(14, 14)),
        _sam2_size("small", embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                   window_spec=(8, 4, 14, 7), pos_embed_size=(7, 7)),
        _sam2_size("tiny", embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                   window_spec=(8, 4, 14, 7), pos_embed_size=(7, 7)),
        # Compact configs for the bundled CPU model: same structure, trained from scratch.
        # Patch stride 8 quarters the token count. The first window (4) must divide the stage-1
        # grid (input/8) for the tiled window embedding, which any multiple of 32 does; windows
        # stay even so q-pooled windows halve exactly; the small late grids use global attention.
        Sam2UnetConfig(
            name="compact",
            embed_dim=48,
            num_heads=1,
            stages=(1, 2, 4, 1),
            global_att_blocks=(4, 5, 6, 7),
            window_spec=(4, 4, 4, 4),
            patch_kernel=7,
            patch_stride=8,
            patch_padding=3,
            adapter_dim=16,
            rfb_channels=32,
            unused_up4=False,
            work_size=192,
        ),
    )
}
CONFIGS["compact_s"] = replace(
    CONFIGS["compact"], name="compact_s", embed_dim=32, stages=(1, 1, 2, 1), global_att_blocks=(3, 4), rfb_channels=24
)


# Tried for the bundled model and not chosen (docs/performance.md): patch stride 4 as in the
# official models, finer first features (48x48 at the work size) for a narrower trunk; and the
# same with the official decoder width (RFB to 64 channels) and a second finest-stage block.
# For a GPU run (scripts/gpu_train.sh): three times compact's parameters (12.6 M, a 52 MB ONNX),
# 2.3x its time per slice on the 2-core CPU (23 ms against 10, loaded machine), inside the
# product's 100 ms and 60 MB; too slow to train on that CPU in a session.
CONFIGS["medium"] = replace(
    CONFIGS["compact"], name="medium", embed_dim=64, stages=(1, 2, 6, 2), global_att_blocks=(4, 5, 6, 7, 8, 9, 10),
    adapter_dim=32, rfb_channels=48,
)
CONFIGS["compact_s4"] = replace(CONFIGS["compact"], name="compact_s4", embed_dim=32, patch_stride=4)
CONFIGS["compact_w"] = replace(
    CONFIGS["compact_s4"], name="compact_w", stages=(2, 2, 4, 1), global_att_blocks=(5, 6, 7, 8), rfb_channels=64
)


def get_config(name_or_config: str | Sam2UnetConfig) -> Sam2UnetConfig:
    """A config by name (see CONFIGS), or the config itself."""
    if isinstance(name_or_config, Sam2UnetConfig):
        return name_or_config
    try:
        return CONFIGS[name_or_config]
    except KeyError:
        known = ", ".join(CONFIGS)
        raise ValueError(
            f"unknown SAM2-UNet config {name_or_config!r}; use one of {known}"
        ) from None


def tiny_test_config(**changes) -> Sam2UnetConfig:
    """A very small config with the full structure (windows, q-pool, global blocks): for tests."""
    base = Sam2UnetConfig(
        name="test",
        embed_dim=16,
        num_heads=1,
        stages=(1, 2, 2, 1),
        global_att_blocks=(4,),
        window_spec=(8, 4, 8, 4),
        adapter_dim=8,
        rfb_channels=16,
    )
    return replace(base, **changes)
