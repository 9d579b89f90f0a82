"""World-scenario ("HDMap + bbox") control videos, rendered on the CPU as the reference's OpenGL renderer does.

Spec: `docs/control_videos.md`. Entry point: `python tools/render_control.py SCENE_DIR OUT_DIR` (pipeline.run).
Modules, dependencies pointing down the list:
    pipeline    clip -> control videos in the post-training layout (+ raw frames, preview grid), worker processes
    render      element preparation, draw order, per-frame projection (compat "reference" | "fixed")
    rdshq       RDS-HQ clip loader -> scene.Scene (the ClipGT parquet format is not read: it needs pyarrow)
    rig         the shipped default 7-camera rig
    raster      numpy rasteriser: thick NDC-width lines with round caps, triangles, 24-bit depth test, 4x MSAA
    geometry    subdivision, laneline patterns, cuboids, triangulation
    ftheta      the f-theta camera model
    palette     v3 colours, laneline styles, object type -> colour class
    scene       dataclasses;  transforms: rotations and pose interpolation
"""
