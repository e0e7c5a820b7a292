"""`--stagger auto` / `--attention auto`: the stored `bcjax tune` winner for this run's devices, or
the model's prediction when there is none (said in one line).

A stored tuning is used only when every field of its key matches this run (`bcjax.tune.store`):
device kind and count, mesh, model shape, sampler, mask, latent size, dtype, quant, bcjax version.
Otherwise the line names what differs, and the choice falls back to the prediction: the stagger
with the highest low-end FPS of `bcjax.bench.comm.predict` on hardware it knows, elsewhere (a CPU)
the fewest matmul FLOPs per block on the busiest device; the attention backend the platform's
default ("auto").
"""

from __future__ import annotations

import dataclasses

from bcjax.tune.store import TuneKey, lookup

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Choice:
    stagger: str
    attention: str | None  # None: the run's own default (the flag was not "auto")
    group: int | None  # token group of the tuned winner (None: the least padding)
    source: str  # "tuned", "predicted" or "given"
    line: str  # what to tell the user ("" when nothing was automatic)
    decode_device: str | None = None  # the tuned --decode-device (`bcjax tune --decoder`), if any


def run_key(cfg, pcfg, latent_hw, mask: str, mesh, model: str) -> TuneKey:
    """The tuning key of a run on `mesh` (None: one device, the default device)."""
    import jax

    from bcjax.model.tensor_parallel import model_size

    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    return TuneKey.make(cfg, pcfg, device_kind=devices[0].device_kind, devices=len(devices),
                        model_devices=model_size(mesh), model=model, mask=mask, latent_hw=latent_hw,
                        dtype=str(cfg.dtype), quant=cfg.quant)


def resolve(cfg, pcfg, latent_hw, mask: str, mesh, *, stagger: str, attention: str | None, model: str = "",
            folder: str | None = None, pcfg_for=None) -> Choice:
    """The (stagger, attention, group) a run uses; `stagger`/`attention` other than "auto" are kept."""
    if AUTO not in (stagger, attention):
        return Choice(stagger, attention, None, "given", "")
    key = run_key(cfg, pcfg, latent_hw, mask, mesh, model)
    record, why = lookup(key, folder)
    flags = " / ".join(f"--{k} auto" for k, v in (("stagger", stagger), ("attention", attention)) if v == AUTO)
    if record is not None:
        best = record["winner"]
        use_stagger = best["stagger"] if stagger == AUTO else stagger
        use_attention = best["attention"] if attention == AUTO else attention
        group = best["group"] if use_stagger == best["stagger"] else None
        fps = 1e3 * record.get("video_frames_per_block", 12) / best["block_ms"]
        placed = (record.get("decode") or {}).get("winner")
        return Choice(use_stagger, use_attention, group, "tuned",
                      f"bcjax: {flags}: {use_stagger}{f', attention {use_attention}' if attention == AUTO else ''}"
                      f"{f', token group {group}' if group else ''} (measured by `bcjax tune` on {key.describe()}: "
                      f"{fps:.1f} FPS)", placed["spec"] if placed else None)
    use_stagger, how = (predict_stagger(cfg, pcfg, latent_hw, mask, mesh, key, pcfg_for) if stagger == AUTO
                        else (stagger, "given"))
    use_attention = "auto" if attention == AUTO else attention
    return Choice(use_stagger, use_attention, None, "predicted",
                  f"bcjax: {flags}: {use_stagger}{', attention: the platform default' if attention == AUTO else ''}"
                  f" by the model's prediction ({how}), not measured: {why}; `bcjax tune` measures these devices")


def predict_stagger(cfg, pcfg, latent_hw, mask: str, mesh, key: TuneKey, pcfg_for=None) -> tuple[str, str]:
    """(the predicted fastest of sequential, P2, P4, how it was predicted)."""
    from bcjax.bench import comm
    from bcjax.tune.measure import STAGGERS, Candidate, Setup, flops_per_block, predicted_fps

    setup = Setup(cfg, pcfg, tuple(latent_hw), mask, mesh, None, None, 12, pcfg_for)
    hardware = comm.hardware_for(key.device_kind, key.devices)
    cands = [Candidate(s, "auto") for s in STAGGERS]
    if hardware is not None:
        fps = {c.stagger: predicted_fps(setup, c, hardware) for c in cands}
        best = max(fps, key=lambda s: fps[s][0])  # type: ignore[index]
        lo, hi = fps[best]  # type: ignore[misc]
        return best, f"{lo:.0f}-{hi:.0f} FPS on {hardware.name}s by `bcjax bench comm`'s model"
    flops = {c.stagger: flops_per_block(setup, c) for c in cands}
    best = min(flops, key=lambda s: flops[s])  # a tie goes to the first: sequential (its output, least latency)
    return best, f"fewest FLOPs per block on the busiest device; no speed model for {key.device_kind}"
