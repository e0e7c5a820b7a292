"""Regenerate tests/data/taehv_reference.npz: upstream TAEHV's outputs on seeded random weights.

    python tests/data/make_taehv_reference.py /path/to/madebyollin/taehv   # a checkout or `git worktree`

Upstream `taehv.py` (madebyollin/taehv, main branch; made at 1f14a568) is imported from the given folder and run
once, in fp32 on the CPU, at its real taew2_1 architecture (its channel widths are fixed in the
code) on a tiny clip:

- decode_video(parallel=True) of 4 latent frames (3x4 latent), the whole clip;
- StreamingTAEHV.decode of the same latents fed in two blocks of 2 frames, every frame drained;
- encode_video(parallel=True) of 9 frames of 24x32 video.

The weights (about 10M parameters, 40 MB) are not stored: `random_state_dict` draws them from a
seed in upstream's key order, with numpy only, so the test rebuilds the same weights without the
upstream repository or torch. The npz holds the seed, the key list with shapes (the test checks
them against bcjax's converter table), the inputs and the outputs (a few hundred kB).
"""

from __future__ import annotations

import os
import sys

import numpy as np

SEED = 2024
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "taehv_reference.npz")


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded float32 weights for upstream-layout keys, scaled so random activations neither die nor
    saturate the output clamp: He-scaled kernels, small biases, the decoder's output conv scaled to
    a tenth with its bias at 0.5 (so most pixels land inside upstream's [0, 1] clamp)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        w = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 4:  # conv [O, I, kh, kw]
            fan_in = shape[1] * shape[2] * shape[3]
            # a MemBlock's last conv feeds a residual sum: keep that stream from growing block by block
            gain = 0.5 if ".conv.4." in key else 1.0
            w *= gain * np.sqrt(2.0 / fan_in)
        else:
            w *= 0.05
        out[key] = w
    last = max(int(k.split(".")[1]) for k in shapes if k.startswith("decoder."))
    out[f"decoder.{last}.weight"] *= np.float32(0.1)
    out[f"decoder.{last}.bias"] += np.float32(0.5)
    return out


def main(repo: str) -> None:
    sys.path.insert(0, repo)
    import torch
    from taehv import TAEHV, StreamingTAEHV

    torch.manual_seed(0)
    model = TAEHV(checkpoint_path=None).float().eval()  # taew2_1's architecture: 16 latent channels, patch 1
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state_dict(shapes).items()})
    rng = np.random.default_rng(SEED + 1)
    z = rng.standard_normal((1, 4, 3, 4, 16)).astype(np.float32)  # [B, F, h, w, C] channels-last
    video = rng.uniform(0, 1, (1, 9, 24, 32, 3)).astype(np.float32)
    with torch.no_grad():
        zt = torch.from_numpy(z).permute(0, 1, 4, 2, 3)  # NTCHW
        whole = model.decode_video(zt, parallel=True, show_progress_bar=False)
        seq = model.decode_video(zt, parallel=False, show_progress_bar=False)
        streaming, frames = StreamingTAEHV(model), []
        for block in zt.split(2, dim=1):
            frame = streaming.decode(block)
            while frame is not None:
                frames.append(frame)
                frame = streaming.decode()
        streamed = torch.cat(frames, 1)
        latents = model.encode_video(torch.from_numpy(video).permute(0, 1, 4, 2, 3), parallel=True,
                                     show_progress_bar=False)

    def last(x):
        return x.permute(0, 1, 3, 4, 2).numpy()

    print(f"whole {tuple(whole.shape)}, streamed {tuple(streamed.shape)}, |whole - sequential| "
          f"{(whole - seq).abs().max():.2e}, |whole - streamed| {(whole - streamed).abs().max():.2e}, "
          f"unclamped {((whole > 0) & (whole < 1)).float().mean():.0%}, latents {tuple(latents.shape)}")
    keys = sorted(shapes)
    tmp = OUT + ".tmp.npz"
    np.savez_compressed(
        tmp, seed=np.int64(SEED), keys=np.array(keys), shapes=np.array([",".join(map(str, shapes[k])) for k in keys]),
        latents=z, decoded=last(whole), streamed=last(streamed), video=video, encoded=last(latents),
    )
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
