"""The pixel decoders a stream can use (the Wan VAE, TAEHV) behind one interface, and where they run.

Both decoders stream the same way: `init_state(batch, latent_hw)`, then `step(state, z)` per block
returns (state, video [B, 4F, H, W, 3] in [-1, 1]) whose first step's `first_chunk_padding` leading
frames are padding. Callers never branch on which decoder it is.

Placement. Ticks of a cascade run in lockstep, so a decode on a mesh device delays every device's
next tick. `decode_device` picks a device outside the `tokens` x `model` mesh when there is one,
else the host CPU; the decoder's weights live there and each block's latents are copied there, so
the decode runs beside the denoising (`bcjax generate`: on its own thread,
`bcjax.app.streaming.overlapped`; `bcjax serve`: dispatched before the next step and fetched
after it, on the tab's one thread, `bcjax.serve.session`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal, get_args

import jax

from bcjax.vae import taehv, wan_vae

Decoder = Literal["wan", "taehv"]
DECODERS: tuple[str, ...] = get_args(Decoder)


@dataclasses.dataclass(frozen=True)
class PixelDecoder:
    """A streaming decoder (`name` in DECODERS) with its config and weights on `device`."""

    name: str
    cfg: wan_vae.VAEConfig | taehv.TAEHVConfig
    params: object
    device: object = None  # jax.Device, or None: wherever the params are

    def __post_init__(self):
        if self.name not in DECODERS:
            raise ValueError(f"unknown decoder {self.name!r}; known: {', '.join(DECODERS)}")
        if self.device is not None:
            object.__setattr__(self, "params", jax.device_put(self.params, self.device))

    @property
    def _module(self):
        return wan_vae if self.name == "wan" else taehv

    @property
    def first_chunk_padding(self) -> int:
        return self.cfg.first_chunk_padding

    @property
    def spatial_scale(self) -> int:
        return self.cfg.spatial_scale

    def init_state(self, batch: int, latent_hw: tuple[int, int]):
        state = self._module.init_decode_state(self.cfg, batch, latent_hw)
        return state if self.device is None else jax.device_put(state, self.device)

    def step(self, state, z):
        """(state, video [B, 4F, H, W, 3] float32 in [-1, 1]) for the next block z [B, F, h, w, C]."""
        if self.device is not None:
            z = jax.device_put(z, self.device)
        return self._module.decode_step(self.cfg, self.params, state, z)


def mesh_devices(mesh) -> list:
    """The denoiser's devices: the mesh's, or the default device when it runs without one."""
    return list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]


def decode_device(spec: str | None, mesh=None):
    """The device decoding runs on.

    spec: None or "auto" (the first device outside the mesh; without one, the mesh's first
    device on an accelerator, the host on CPU), "cpu" (the host), or a device id
    (`jax.devices()[i].id`). A device inside the mesh is allowed, with a warning: the decode then
    delays that device's next tick, and with it every device's (ticks run in lockstep).

    Why "auto" does not fall back to the host on an accelerator: a 480x832 Wan VAE block is about
    40 TFLOP (`bcjax bench decode`), minutes on a host CPU against tens of milliseconds on the
    accelerator, so stalling the mesh's first device for one decode costs far less than the host; pass "cpu" to
    choose the host anyway (TAEHV at small sizes).
    """
    inside = mesh_devices(mesh)
    if spec in (None, "auto"):
        free = [d for d in jax.devices() if d not in inside and d.process_index == jax.process_index()]
        if free:
            return free[0]
        return inside[0] if inside and inside[0].platform != "cpu" else jax.devices("cpu")[0]
    if spec == "cpu":
        return jax.devices("cpu")[0]
    try:
        wanted = int(spec)
    except ValueError:
        raise ValueError(f"--decode-device {spec!r}: expected auto, cpu or a device id "
                         f"({', '.join(str(d.id) for d in jax.devices())})") from None
    by_id = {d.id: d for d in jax.devices()}
    if wanted not in by_id:
        raise ValueError(f"--decode-device {wanted}: no such device; ids are {sorted(by_id)}")
    device = by_id[wanted]
    if device in inside and len(jax.devices()) > 1:
        where = f"mesh position {inside.index(device)}"
        warnings.warn(f"--decode-device {wanted} is {where} of the denoising mesh: each block's decode delays that "
                      "device's next tick, and every device's with it (ticks run in lockstep); a device outside the "
                      "mesh or the host (auto, cpu) keeps the denoiser's pace", stacklevel=2)
    return device
