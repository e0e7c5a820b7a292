"""Decode placement for `bcjax tune --decoder`: where a block's pixels are decoded.

Candidates (`placements`): the mesh's first device (the decode then stalls every device's next
tick: ticks run in lockstep), the first device outside the mesh (when there is one), and the host
CPU (only for TAEHV or on a CPU: a 480x832 Wan VAE block is about 40 TFLOP, minutes on a host).
Each decodes steady-state blocks (after the first, whose leading frames are padding) of the
decoder's shape with random weights; a stream then makes one block every

    block_ms + decode_ms           on a mesh device (in series with the ticks)
    max(block_ms, decode_ms)       elsewhere (overlapped: `bcjax.app.streaming`)

and the placement with the least period wins. The stored spec is what `--decode-device` takes
(a device id, or "cpu").
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax


@dataclasses.dataclass
class Placement:
    where: str  # "mesh", "outside", "host"
    spec: str  # the --decode-device value: a device id or "cpu"
    inside: bool  # on a mesh device: in series with the ticks
    decode_ms: float | None = None
    compile_s: float | None = None
    error: str | None = None

    def period_ms(self, block_ms: float) -> float | None:
        """ms between blocks of a stream whose denoiser makes one every `block_ms`."""
        if self.decode_ms is None:
            return None
        return block_ms + self.decode_ms if self.inside else max(block_ms, self.decode_ms)


def placements(mesh, decoder: str) -> list[tuple[Placement, object]]:
    """(placement, device) candidates for a denoiser on `mesh` (None: the default device)."""
    from bcjax.vae.decoders import mesh_devices

    inside = mesh_devices(mesh)
    out = [(Placement("mesh", str(inside[0].id), True), inside[0])]
    free = [d for d in jax.devices() if d not in inside and d.process_index == jax.process_index()]
    if free:
        out.append((Placement("outside", str(free[0].id), False), free[0]))
    host = jax.devices("cpu")[0]
    if (decoder == "taehv" or inside[0].platform == "cpu") and host not in inside and host not in free[:1]:
        out.append((Placement("host", "cpu", False), host))
    return out


def decoder_for(name: str, checkpoint: str | None, preset: str, dtype: str):
    """(config, random params) of the decoder `name`: a checkpoint's stored shape, or the preset's
    (tiny for the tiny DiT, else the real one). Speed does not depend on the weights' values."""
    from bcjax.vae import taehv, wan_vae

    module, part = (wan_vae, "vae") if name == "wan" else (taehv, "taehv")
    if checkpoint is not None:
        from bcjax.checkpoint import read_config

        cfg = read_config(checkpoint)["configs"].get(part)
        if cfg is None:
            raise ValueError(f"--decoder {name}: {checkpoint} has no {part!r} part to time")
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype) if hasattr(cfg, "param_dtype") else cfg
    else:
        cls = wan_vae.VAEConfig if name == "wan" else taehv.TAEHVConfig
        real = "wan2.1" if name == "wan" else "taew2_1"
        size = "tiny" if preset == "tiny" and "tiny" in cls.preset_names() else real
        cfg = cls.preset(size, dtype=dtype, param_dtype=dtype) if name == "wan" else cls.preset(size)
    return cfg, module.init_params(cfg, jax.random.key(7)), module


def measure(p: Placement, device, decoder, latent_hw, block_frames: int, repeats: int = 3) -> Placement:
    """Decode `repeats` steady-state blocks on `device`; an error is the placement's content."""
    import jax.numpy as jnp

    cfg, params, module = decoder
    try:
        step = jax.jit(lambda prm, st, z: module.decode_step(cfg, prm, st, z))
        prm = jax.device_put(params, device)
        state = jax.device_put(module.init_decode_state(cfg, 1, tuple(latent_hw)), device)
        z = jax.device_put(jnp.zeros((1, block_frames, *latent_hw, cfg.z_dim if hasattr(cfg, "z_dim")
                                      else cfg.latent_channels), jnp.float32), device)
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(step(prm, state, z))  # the first block: compile, padding frames
        p.compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(step(prm, state, z))
            times.append(time.perf_counter() - t0)
        p.decode_ms = 1e3 * statistics.median(times)
    except Exception as e:  # noqa: BLE001 - a placement that fails is a row saying why
        p.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return p


def best(found: list[Placement], block_ms: float) -> Placement | None:
    ok = [p for p in found if p.period_ms(block_ms) is not None]
    return min(ok, key=lambda p: p.period_ms(block_ms)) if ok else None  # type: ignore[arg-type, return-value]
