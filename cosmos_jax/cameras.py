"""The seven cameras of the auto-multiview model: order (= view index), folder keys, training caption prefixes.

Reference: `predict2_multiview/datasets/multiview.py` (`DEFAULT_CAMERAS`, `DEFAULT_CAPTION_PREFIXES`).
"""

from __future__ import annotations

CAMERAS: tuple[str, ...] = (
    "camera_front_wide_120fov",
    "camera_cross_right_120fov",
    "camera_rear_right_70fov",
    "camera_rear_tele_30fov",
    "camera_rear_left_70fov",
    "camera_cross_left_120fov",
    "camera_front_tele_30fov",
)

_CAR = "The video is captured from a camera mounted on a car."
CAPTION_PREFIXES: dict[str, str] = {
    "camera_front_wide_120fov": f"{_CAR} The camera is facing forward.",
    "camera_cross_right_120fov": f"{_CAR} The camera is facing to the right.",
    "camera_rear_right_70fov": f"{_CAR} The camera is facing the rear right side.",
    "camera_rear_tele_30fov": f"{_CAR} The camera is facing backwards.",
    "camera_rear_left_70fov": f"{_CAR} The camera is facing the rear left side.",
    "camera_cross_left_120fov": f"{_CAR} The camera is facing to the left.",
    "camera_front_tele_30fov": "The video is captured from a telephoto camera mounted on a car. The camera is facing forward.",
}

CAPTION_CAMERA = "camera_front_wide_120fov"  # the one view whose caption text is used (single_caption_camera_name)


def training_view_captions(caption: str, view_ids=tuple(range(len(CAMERAS))), caption_position: int = 0) -> list[str]:
    """Per-view training strings: `"{prefix} {caption}"` at `caption_position`, `"{prefix} "` elsewhere; the prefix
    is that of the base-rig camera of each view id (custom rigs map their cameras to the closest one)."""
    bad = [v for v in view_ids if not 0 <= v < len(CAMERAS)]
    if bad:
        raise ValueError(f"view ids {bad} are outside the base rig's 0..{len(CAMERAS) - 1}")
    return [f"{CAPTION_PREFIXES[CAMERAS[v]]} {caption if i == caption_position else ''}"
            for i, v in enumerate(view_ids)]
