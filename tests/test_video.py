"""PyAV video I/O: MP4 round trip, frame selection, clear errors, and the reference's antialiased resize."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from cosmos_jax.data import video


def _clip(n=12, h=64, w=96):
    t = np.arange(n)[:, None, None]
    yy, xx = np.mgrid[0:h, 0:w]
    r = 128 + 100 * np.sin((xx + 3 * t) / 9.0)
    g = np.broadcast_to(yy * (255 // h), (n, h, w))
    b = (xx + yy + 5 * t) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    clip = _clip()
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    video.write_video(path, clip, fps=10)
    return path, clip


def test_mp4_round_trip(mp4):
    path, clip = mp4
    info = video.probe(path)
    assert (info.fps, info.num_frames, info.height, info.width) == (10.0, 12, 64, 96)
    frames = video.read_frames(path)
    assert frames.dtype == np.uint8 and frames.shape == clip.shape
    assert np.mean(np.abs(frames.astype(int) - clip)) < 4  # H.264 at crf 18 is lossy but close
    # frames come back in order: each decoded frame is nearest to its own source frame
    err = np.abs(frames[:, None].astype(int) - clip[None]).mean(axis=(2, 3, 4))
    assert list(err.argmin(axis=1)) == list(range(len(clip)))


def test_selected_indices_in_the_asked_order(mp4):
    path, _ = mp4
    every = video.read_frames(path)
    some = video.read_frames(path, [11, 0, 5, 5], threads=2)
    np.testing.assert_array_equal(some, every[[11, 0, 5, 5]])


def test_frame_beyond_the_end_names_file_and_count(mp4):
    path, _ = mp4
    with pytest.raises(video.VideoError, match=r"clip\.mp4.*frame 12.*only 12 frames"):
        video.read_frames(path, [0, 12])


def test_unreadable_files_name_the_file(mp4, tmp_path):
    path, _ = mp4
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    for p in (bad, truncated, tmp_path / "missing.mp4"):
        with pytest.raises(video.VideoError, match=p.name):
            video.read_frames(p)
        with pytest.raises(video.VideoError, match=p.name):
            video.probe(p)


def test_write_refuses_bad_frames_and_never_leaves_half_files(mp4, tmp_path):
    path, clip = mp4
    target = tmp_path / "out.mp4"
    target.write_bytes(path.read_bytes())
    with pytest.raises(video.VideoError, match="even"):
        video.write_video(target, clip[:, :63], fps=10)
    with pytest.raises(video.VideoError, match="uint8"):
        video.write_video(target, clip.astype(np.float32), fps=10)
    assert target.read_bytes() == path.read_bytes()  # the existing file is untouched
    assert os.listdir(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize("src,dst", [((108, 192), (72, 128)), ((37, 53), (20, 30)), ((20, 30), (45, 70)),
                                     ((704, 1280), (720, 1280))])
def test_resize_matches_torch_antialiased_bilinear(src, dst):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:src[0], 0:src[1]]
    img = np.stack([127 + 100 * np.sin(xx / 7.0 + c) * np.cos(yy / 11.0) + rng.normal(0, 20, src)
                    for c in range(3)], -1).clip(0, 255).astype(np.uint8)
    mine = video.resize(img[None], dst)[0]
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=dst, mode="bilinear",
                        align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
    diff = np.abs(mine.astype(int) - ref.astype(int))
    assert mine.shape == dst + (3,)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95  # torch's uint8 kernel uses fixed-point weights


def test_resize_identity_and_errors():
    img = _clip(2, 16, 24)
    np.testing.assert_array_equal(video.resize(img, (16, 24)), img)
    with pytest.raises(ValueError, match="uint8"):
        video.resize(img.astype(np.float32), (8, 8))


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_vae_roundtrip_tool_psnr_of_perfect_and_shifted_reconstructions(mp4, tmp_path, vae_case_a, monkeypatch):
    """The tool's PSNR on known reconstructions: an ideal autoencoder scores >= 100 dB (exact uint8 round trip); a
    reconstruction one frame late scores the PSNR of the frame-shifted input, computed here, far below."""
    from cosmos_jax.models import wan_vae
    from tools import vae_roundtrip

    path, _ = mp4
    weights = str(vae_case_a / "weights.safetensors")
    # what the tool must compare against: the first 4k+1 <= 11 frames (9), resized to 32x48
    pixels = video.resize(video.read_frames(path, range(9)), (32, 48))
    monkeypatch.setattr(wan_vae, "encode", lambda params, x, cfg: x)
    monkeypatch.setattr(wan_vae, "decode", lambda params, z, cfg: z)
    perfect = vae_roundtrip.roundtrip(str(path), str(tmp_path / "perfect.mp4"), weights=weights, frames=11,
                                      size=(32, 48), dtype="float32")
    assert perfect >= 100.0
    written = video.read_frames(tmp_path / "perfect.mp4")
    assert written.shape == pixels.shape and np.mean(np.abs(written.astype(int) - pixels)) < 4  # H.264, crf 18

    monkeypatch.setattr(wan_vae, "decode", lambda params, z, cfg: jnp.concatenate([z[:, :1], z[:, :-1]], axis=1))
    late = vae_roundtrip.roundtrip(str(path), str(tmp_path / "late.mp4"), weights=weights, frames=11,
                                   size=(32, 48), dtype="float32")
    want = _psnr(np.concatenate([pixels[:1], pixels[:-1]]), pixels)
    assert want < 30.0 and abs(late - want) < 1e-6, (late, want)


def test_vae_roundtrip_tool_writes_a_video(mp4, tmp_path, vae_case_a):
    from tools import vae_roundtrip

    path, _ = mp4
    out = tmp_path / "recon.mp4"
    psnr = vae_roundtrip.roundtrip(str(path), str(out), weights=str(vae_case_a / "weights.safetensors"),
                                   frames=9, size=(32, 48), dtype="float32")
    info = video.probe(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 32, 48, 10.0)
    # the fixture's VAE has random weights: it does not reconstruct, and the tool must not claim it does
    # (a PSNR of the output against itself would be >= 100 dB)
    assert 0.0 < psnr < 20.0
