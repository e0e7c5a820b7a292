"""`bcjax demo`: an embedded toy-world model, sequential vs Block Cascading, as a labelled mp4 and a report.

For a few fixed prompts the given first block (the still image) is continued for about 40 frames by the
sequential pipeline, by the best cascade of the toy-world study (P4 with the causal mask, the
default one) and by the paper's P4 bidirectional; the video (5 s at 8 fps) shows, side by side,
ground truth | sequential | P4 causal | P4 bidirectional (one row per prompt), and the report
holds each setting's error against ground truth and its steady generation speed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import numpy as np

from bcjax.app.video import frames_per_block, publish
from bcjax.distributed import is_primary
from bcjax.names import DEFAULT_MASK, SEQUENTIAL, Policy, Positions, as_backend, as_mask
from bcjax.toyworld.evaluate import ToyModel, block_metrics, eval_scenes, load_model, setting_name, summary
from bcjax.toyworld.png import draw_text
from bcjax.toyworld.world import prompt_text, render, to_rgb

# the toy world has no VAE: its latents are its frames (see bcjax.app.video.frames_per_block)
TEMPORAL_SCALE = 1
# sequential, the best cascade of docs/toyworld-study.md, and the paper's recommended one for contrast
COLUMNS = (("sequential", None), ("P4", "causal"), ("P4", "bidirectional"))
LABELS = ("TRUTH", "SEQUENTIAL", "P4 CAUSAL", "P4 BIDIR")
# about 40 generated frames at 8 fps, 5 s: 40 blocks of causal-1f's 1 frame, 14 of a 3-frame-block model's
FRAMES, FPS = 40, 8.0
BLOCKS = FRAMES  # of a 1-frame-block model (causal-1f)


def default_blocks(model: ToyModel) -> int:
    """Blocks that make about FRAMES generated frames (the world moves once per block)."""
    return -(-FRAMES // model.world.block_frames)


def timed_stream(model: ToyModel, scenes, num_blocks: int, key, stagger: str, mask: str | None, mesh=None):
    """(latents [B, (1 + num_blocks) * bf, H, W, C], first-block s incl. compile, steady ms per
    block): the streaming APIs, block by block, as a viewer would receive them."""
    import jax.numpy as jnp

    from bcjax.model.wan import text_kv
    from bcjax.runners import make_runner
    from bcjax.toyworld.world import prompt_embedding

    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    hw, bf = (world.size, world.size), pcfg.block_frames
    first = jnp.asarray(np.stack([render(s, bf, world) for s in scenes]))
    text = text_kv(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])))
    # mask None: sequential, one block in flight
    runner = make_runner(cfg, pcfg, hw, stagger, as_mask(mask or DEFAULT_MASK), mesh)
    stream = runner.blocks(model.params, text, key, num_blocks=num_blocks, context=first)
    out, times = [np.asarray(first)], []
    t0 = time.perf_counter()
    for _, x0 in stream:
        out.append(np.asarray(x0))  # blocks until this block is ready
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    steady = sorted(times[2:] or times)
    return np.concatenate(out, axis=1), times[0], 1e3 * steady[len(steady) // 2]


def compose(latents: list[np.ndarray], scenes, model: ToyModel, scale: int = 8) -> np.ndarray:
    """uint8 video [F, H, W, 3]: a label header, then one row per prompt of panels (truth, then
    each setting), sides padded to multiples of 16 for the codec."""
    world = model.world
    f = latents[0].shape[1]
    panels = [np.stack([render(s, f, world) for s in scenes]), *latents]  # [B, F, h, w, C] each
    gap, head, foot, side = 4, 14, 14, world.size * scale
    h = head + len(scenes) * (side + gap) + gap + foot
    w = len(panels) * (side + gap) + gap
    h16, w16 = -(-h // 16) * 16, -(-w // 16) * 16
    video = np.full((f, h16, w16, 3), 32, np.uint8)  # dark, so the white walls stand out
    for j, label in enumerate(LABELS[:len(panels)]):
        draw_text(video[0], label, 4, gap + j * (side + gap) + 2, colour=(255, 255, 255), scale=2)
    video[1:, :head] = video[0, :head]
    for i in range(len(scenes)):
        for j, lat in enumerate(panels):
            rgb = to_rgb(lat[i], world)  # [F, h, w, 3]
            big = np.repeat(np.repeat(rgb, scale, 1), scale, 2)
            y, x = head + gap + i * (side + gap), gap + j * (side + gap)
            video[:, y:y + side, x:x + side] = big
    # frame counter in the footer's right corner, on the dark background below the panels (their
    # walls are white); given frames marked red so the seam is visible
    for t in range(f):
        draw_text(video[t], f"{t:02d}", h16 - 12, w16 - 30,
                  colour=(255, 80, 80) if t < world.block_frames else (255, 255, 255), scale=2)
    return video


def frames_png(path: str, latents: list[np.ndarray], scenes, model: ToyModel, scale: int | None = None) -> np.ndarray:
    """Write a still of the demo laid out as its video (`compose`): a label header, one row per
    prompt, one column per panel (truth, then each setting); a panel holds the last frame of every
    block in reading order (left to right, then down), the given first block first, outlined red
    (scale: pixels per latent pixel; default 6, 3 past 16 blocks). Returns the image."""
    from bcjax.toyworld.png import image_grid, write_png

    world = model.world
    bf = world.block_frames
    f = latents[0].shape[1]
    pick = np.arange(bf - 1, f, bf)  # each block's last frame
    scale = scale or (6 if len(pick) <= 16 else 3)
    per_row = int(np.ceil(np.sqrt(len(pick))))
    side, gap, head = world.size * scale, 4, 14
    panels = [np.stack([render(s, f, world) for s in scenes]), *latents]  # [B, F, h, w, C] each
    cells: list[list[np.ndarray]] = []  # [prompt][panel] -> uint8 [ch, cw, 3]
    for i in range(len(scenes)):
        cells.append([])
        for lat in panels:
            rgb = to_rgb(lat[i][pick], world)
            cell = image_grid([rgb[k:k + per_row] for k in range(0, len(rgb), per_row)], scale=scale, gap=2,
                              background=(32, 32, 32))
            given = cell[:side + 4, :side + 4]  # the first tile and the 2-pixel gap around it
            tile = given[2:-2, 2:-2].copy()
            given[:] = (255, 80, 80)  # red, as the video's frame counter on the given frames
            given[2:-2, 2:-2] = tile
            cells[-1].append(cell)
    ch, cw = cells[0][0].shape[:2]
    img = np.full((head + len(scenes) * (ch + gap) + gap, len(panels) * (cw + gap) + gap, 3), 32, np.uint8)
    text = 2 if cw >= 4 * 2 * max(len(s) for s in LABELS) + 4 else 1
    for j, label in enumerate(LABELS[:len(panels)]):
        draw_text(img, label, 4, gap + j * (cw + gap) + 2, colour=(255, 255, 255), scale=text)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = head + gap + i * (ch + gap), gap + j * (cw + gap)
            img[y:y + ch, x:x + cw] = cell
    write_png(path, img)
    return img


def _model_name(model: ToyModel) -> str:
    """The embedded model's name (`bcjax.names.TOY_MODELS`), else 'custom'."""
    from bcjax.toyworld.evaluate import EMBEDDED

    here = os.path.realpath(model.path) if model.path else None
    return next((n for n, p in EMBEDDED.items() if os.path.realpath(p) == here), "custom")


def write_report(path: str, model: ToyModel, scenes, rows: dict, timing: dict, video: str,
                 frames: str | None = None, per_block: dict | None = None) -> str:
    trained_by = (" -> ".join(dict.fromkeys(s["stage"] for s in model.provenance.get("stages", [])))
                  or "clean-context teacher forcing")
    lines = ["# bcjax demo: the toy world, sequential vs Block Cascading", "",
             f"Model: {_model_name(model)} toy-world Wan DiT ({model.cfg.num_layers} layers, dim {model.cfg.dim}, "
             f"{sum(x.size for x in jax.tree_util.tree_leaves(model.params)):,} parameters, trained by "
             f"{trained_by}), "
             f"{model.pcfg.num_steps}-step sampler, blocks of {model.pcfg.block_frames} latent frame(s), window "
             f"{model.pcfg.window_frames} latent frames (sink {model.pcfg.sink_frames}); "
             f"{jax.default_backend()}, {jax.device_count()} device(s).", "",
             "Prompts (first block given as the still image, the rest generated):", ""]
    lines += [f"{i}. {prompt_text(s)}" for i, s in enumerate(scenes)]
    lines += ["", "| setting | MSE vs truth | PSNR dB | position err px | seam jump px | MSE to sequential | "
                  "colour right % | crisp frames % | first block s | steady ms/block |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in rows.items():
        first, steady = timing.get(name, (float("nan"), float("nan")))
        lines.append(f"| {name} | {v['mse']:.4f} | {v['psnr']:.2f} | {v['pos_err']:.2f} | {v['jump']:.2f} | "
                     f"{v['div_seq']:.4f} | {100 * v['colour']:.1f} | {100 * v['crisp']:.1f} | {first:.2f} | "
                     f"{steady:.1f} |")
    if per_block:
        nb = next(iter(per_block.values()))["crisp"].shape[1]
        lines += ["", "Crisp frames per generated block, % of prompts (a clean render of the world at the read-back "
                  "sprite corners: no smear, blotch or ghost):", "",
                  "| setting | " + " | ".join(f"b{b + 1}" for b in range(nb)) + " |", "|---" * (nb + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{100 * v:.0f}" for v in m["crisp"].mean(0)) + " |"
                  for name, m in per_block.items()]
    if frames:
        lines += ["", f"![truth and every setting, the last frame of every block]({os.path.basename(frames)})", "",
                  f"`{os.path.basename(frames)}`: laid out as the video, one row per prompt, columns "
                  f"{', '.join(LABELS)}; each panel holds the last frame of every block, left to right then down, "
                  "the given still image first (outlined red)."]
    lines += ["", f"Video: `{os.path.basename(video)}` (columns: {', '.join(LABELS)}; "
                  "frame counter red on the given frames).",
              "Steady ms/block on one device is not the cascade's speed-up: that needs the tick's tokens split over "
              "several devices (`--devices N`, e.g. 5 for P4's five blocks in flight)."]
    text = "\n".join(lines) + "\n"
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".md", delete=False) as f:
        f.write(text)
    publish(f.name, path)
    return text


def _check_out(out: str) -> None:
    """Before any compute: the video path is an .mp4 that can be written (its folder is made
    only when the video is, so a refused run leaves nothing)."""
    from bcjax.paths import check_output

    if not out.lower().endswith(".mp4"):
        raise ValueError(f"--out {out!r} must end in .mp4")
    check_output(out)


def run(out: str = "bcjax-demo.mp4", report: str | None = None, checkpoint: str | None = None, prompts: int = 3,
        blocks: int | None = None, seed: int = 0, devices: int = 1, fps: float = FPS) -> dict:
    """`bcjax demo`: checkpoint an embedded model's name (`bcjax.names.TOY_MODELS`, default the
    reference one) or a toy-world checkpoint; blocks default `default_blocks`."""
    from bcjax.app.video import Mp4Writer
    from bcjax.runners import make_mesh

    _check_out(out)
    if devices > jax.device_count():
        raise ValueError(f"--devices {devices}: only {jax.device_count()} device(s) available")
    model = load_model(checkpoint)
    blocks = blocks or default_blocks(model)
    scenes = eval_scenes(model.world, prompts)
    mesh = make_mesh(devices) if devices > 1 else None
    key = jax.random.key(seed)
    print(f"bcjax demo: toy-world model ({model.cfg.num_layers} layers, dim {model.cfg.dim}), {prompts} prompts, "
          f"{blocks} blocks after the given image, on {jax.default_backend()} ({devices} device(s) on the tokens axis)")
    lat, timing = {}, {}
    for stagger, mask in COLUMNS:
        name = setting_name(stagger, mask)
        lat[name], first, steady = timed_stream(model, scenes, blocks, key, stagger, mask, mesh)
        timing[name] = (first, steady)
        print(f"  {name:<18s} first block {first:6.2f} s (compile incl.), steady {steady:7.1f} ms/block")
    ref = lat["sequential"]
    blocks_m = {n: block_metrics(x, scenes, model.world, ref) for n, x in lat.items()}
    rows = summary(blocks_m, model.world)
    video = compose(list(lat.values()), scenes, model)
    report = report or os.path.splitext(out)[0] + ".md"
    if not is_primary():  # a multi-host job: process 0 writes
        return {"summary": rows, "blocks": blocks_m, "timing": timing, "video": None, "report": None}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with Mp4Writer(out, fps=fps) as w:
        w.write(video)
    frames = os.path.splitext(report)[0] + "-frames.png"
    frames_png(frames, list(lat.values()), scenes, model)
    write_report(report, model, scenes, rows, timing, out, frames, blocks_m)
    for name, v in rows.items():  # the gist; every figure and the per-block table are in the report
        print(f"  {name:<18s} PSNR {v['psnr']:6.2f} dB, position error {v['pos_err']:5.2f} px, "
              f"crisp frames {100 * v['crisp']:5.1f} %")
    print(f"wrote {out} ({video.shape[0]} frames {video.shape[2]}x{video.shape[1]}), {frames} and {report}")
    return {"summary": rows, "blocks": blocks_m, "timing": timing, "video": out, "report": report, "frames": frames}


def stream_frames(frames: np.ndarray, world, title: str, prompt: str, start: int, scale: int = 24) -> np.ndarray:
    """uint8 video frames [F, H, W, 3] of one block of `bcjax stream` (latents [F, h, w, C]),
    labelled as the demo's video: a header with the run (`title`) and the prompt in force, the
    panel, and a frame counter (from `start`, red on the given block) in the footer; sides padded
    to multiples of 16 for the codec."""
    gap, head, foot, side = 4, 30, 14, world.size * scale
    h16, w16 = -(-(head + side + gap + foot) // 16) * 16, -(-(side + 2 * gap) // 16) * 16
    video = np.full((len(frames), h16, w16, 3), 32, np.uint8)
    for row, text in ((4, title.upper()), (18, prompt.upper())):
        draw_text(video[0], text, row, gap + 2, colour=(255, 255, 255),
                  scale=2 if 8 * len(text) <= w16 - 2 * gap else 1)
    video[1:, :head] = video[0, :head]
    video[:, head:head + side, gap:gap + side] = np.repeat(np.repeat(to_rgb(frames, world), scale, 1), scale, 2)
    for t in range(len(frames)):
        draw_text(video[t], f"{start + t:03d}", h16 - 12, w16 - 30,
                  colour=(255, 80, 80) if start + t < world.block_frames else (255, 255, 255), scale=2)
    return video


def stream_run(prompts: str, out: str = "bcjax-stream.mp4", checkpoint: str | None = None, blocks: int = 12,
               stagger: str = "P4", mask: str = DEFAULT_MASK, policy: Policy = "no-recache", seed: int = 0,
               devices: int = 1, fps: float | None = None, scale: int = 24, positions: Positions = "absolute",
               interpolate: int = 0, dtype: str | None = None, attention: str | None = None,
               quant: str | None = None, adapter: str | None = None,
               schedule: str | None = None, window: str | None = None) -> list:
    """`bcjax stream`: the toy-world model continues a still image while the prompt schedule
    'PROMPT@BLOCK;...' switches between blocks; every block is appended to the mp4 as soon as it
    is ready (an interrupted stream leaves a playable file); dtype, attention: see `load_model`.
    adapter: a `bcjax adapt` folder for this model, stagger and mask (the cascade's tick runs it).
    schedule, window: the old names of stagger and mask (deprecated). Returns the StreamEvents."""
    import dataclasses

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from bcjax.app.interactive import parse_prompt_schedule, stream
    from bcjax.app.prompts import interpolate_prompt_schedule
    from bcjax.app.streaming import overlapped
    from bcjax.app.video import Mp4Writer, NullWriter
    from bcjax.flags import renamed_keyword
    from bcjax.model.wan import text_kv
    from bcjax.runners import make_mesh, make_runner
    from bcjax.toyworld.world import check_switch, parse_prompt, prompt_embedding

    stagger = renamed_keyword("schedule", "stagger", schedule, "P4", stagger)
    mask = renamed_keyword("window", "mask", window, DEFAULT_MASK, mask)
    _check_out(out)
    model = load_model(checkpoint, dtype=dtype, attention=attention, quant=quant)
    world, cfg = model.world, model.cfg
    pcfg = dataclasses.replace(model.pcfg, positions=positions)
    prompt_schedule = parse_prompt_schedule(prompts)
    rng = np.random.default_rng(seed)
    scenes = [parse_prompt(text, world) for _, text in prompt_schedule]  # the embedding holds no positions
    # the rules `bcjax serve` applies to a switch
    for (at, text), scene in zip(prompt_schedule[1:], scenes[1:], strict=True):
        if at > blocks:
            raise ValueError(f"--prompts: {text!r}@{at} starts after the stream's last block ({blocks}); "
                             f"raise --blocks to {at} or more, or move the switch")
        try:
            check_switch(scenes[0], scene)
        except ValueError as e:
            raise ValueError(f"--prompts: {text!r}@{at}: {e}") from None
    starts = [(int(y), int(x)) for y, x in (rng.integers(world.lo, world.hi + 1, 2) for _ in scenes[0])]
    embeds = [(b, prompt_embedding(sc, world)[None]) for (b, _), sc in zip(prompt_schedule, scenes, strict=True)]
    if interpolate:  # Krea's prompt interpolation: each switch ramps over `interpolate` blocks
        embeds = interpolate_prompt_schedule(embeds, interpolate)
    prompt_schedule_kv = [(b, text_kv(cfg, model.params, jnp.asarray(e))) for b, e in embeds]
    hw, bf = (world.size, world.size), world.block_frames
    mesh = make_mesh(devices) if devices > 1 else None
    group = None
    if "auto" in (stagger, attention):  # `bcjax tune`'s winner for these devices, or the model's prediction
        from bcjax.tune import resolve

        choice = resolve(cfg, pcfg, hw, mask, mesh, stagger=stagger, attention=attention,
                         model=os.path.basename(model.path.rstrip("/")))
        if is_primary():
            print(choice.line, flush=True)
        stagger, group = choice.stagger, choice.group
        if attention == "auto" and choice.attention is not None:
            cfg = dataclasses.replace(cfg, attention=as_backend(choice.attention))
    lora = None
    if adapter is not None:
        from bcjax.adapt import load

        lora = load(adapter, cfg, model.params)
    runner = make_runner(cfg, pcfg, hw, stagger, as_mask(mask), mesh, token_group=group, adapter=lora)
    first = render(parse_prompt(prompt_schedule[0][1], world, starts), bf, world)[None]

    name = setting_name(stagger, None if stagger == SEQUENTIAL else mask)
    title = f"{name} {policy}"

    def big(frames, block: int):
        prompt = next(text for at, text in reversed(prompt_schedule) if at <= block)  # the one in force from this block
        return stream_frames(frames, world, title, prompt, block * bf, scale)

    events = []
    bar = tqdm(total=blocks, unit="block", desc=f"stream {name}")
    fps = fps or FPS  # as in `run`
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with (Mp4Writer(out, fps=fps) if is_primary() else NullWriter()) as w:  # multi-host: process 0 writes
        w.write(big(first[0], 0))
        def sink(e):  # on a background thread, while the next block denoises
            w.write(big(e.x0[0], e.block))
            return e

        for ev in overlapped(stream(runner, model.params, prompt_schedule_kv,
                                    jax.random.key(seed), blocks, policy=policy, context=jnp.asarray(first)), sink):
            events.append(ev)
            bar.update(1)
            rate = frames_per_block(bf, TEMPORAL_SCALE) / max(ev.seconds, 1e-9)  # frames per second made
            bar.set_postfix(block=ev.block, prompt=ev.prompt, fps=f"{rate:.1f}",
                            recache_ms=f"{1e3 * ev.recache_s:.1f}")
    bar.close()
    steady = sorted(e.seconds for e in events[2:]) or [events[-1].seconds]
    print(f"wrote {out}: {(1 + len(events)) * bf} frames; steady {1e3 * steady[len(steady) // 2]:.1f} ms/block, "
          f"{len(prompt_schedule) - 1} switch(es), policy {policy}")
    return events


if __name__ == "__main__":
    print(json.dumps(run()["summary"], indent=2))
