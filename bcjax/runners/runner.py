"""The one runner every caller uses: a layout (where weights, text K/V and the cache live on the
mesh) plus a program (what one step computes), built by `make_runner` and nothing else.

The programs (internal; a caller never sees which one it got):

- "tick" (`bcjax.cascade.cascade.TickProgram`): the cascade's tick, a joint pass over every block
  in flight; its stagger says how many, from "sequential" (one block, n + 1 ticks, Krea's rules
  included) to P4, its tokens split over the mesh's `tokens` devices. Sequential on several
  `tokens` devices is context parallelism.
- "block" (`bcjax.pipeline.sequential.BlockProgram`): the sequential stagger's whole block (its n
  denoising passes and its clean pass) fused into one call, n + 1 dispatches fewer per block; it
  also runs video-to-video.
- "krea" (`bcjax.pipeline.krea.KreaProgram`): Krea's own loop where the tick cannot follow it: R
  from the VAE round trip (`reencode=`) and keep_first_frame.

Tests pin the block and Krea programs to the tick's sequential stagger (`tests/test_token_split.py`).

    runner = make_runner(cfg, pcfg, latent_hw, stagger="P4", mask="causal", mesh=make_mesh(5))
    latents = runner.generate(params, text, key, num_blocks=7)
    for block in runner.blocks(params, text, key, num_blocks=7): ...
    state = runner.start(params, text, key, num_blocks=None)        # a stream, step by step
    while not runner.done(state):
        state, out = runner.step(params, runner.place_text(text_of(runner.entering(state))), state)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bcjax.cascade.cascade import TickProgram
from bcjax.flags import renamed_keyword
from bcjax.model.config import WanConfig
from bcjax.model.tensor_parallel import Layout, model_size
from bcjax.model.wan import KV, check_latents, text_kv
from bcjax.names import DEFAULT_MASK, MASKS, PROGRAMS, SEQUENTIAL, TOKENS, Mask, Program
from bcjax.pipeline.krea import KreaProgram
from bcjax.pipeline.sequential import BlockProgram
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.stagger import Stagger, make_stagger
from bcjax.stepping import Block, Step, StepState


@dataclasses.dataclass(frozen=True, eq=False)
class Runner:
    """A compiled runner for one model, sampler, latent size, stagger, mask and mesh.

    Built by `make_runner`. Every method has one signature whatever the program: the arguments
    every run needs (params, text K/V, the noise key) positional, the rest keyword-only."""

    program: TickProgram | BlockProgram | KreaProgram
    kind: Program
    # its stagger's name (`bcjax.names.STAGGERS`, any "P<k>", a stride)
    stagger: str | int
    # what the in-flight blocks of a tick see of each other; "causal" for the sequential stagger
    # (one block in flight: nothing newer to see)
    mask: Mask

    # -- what it runs ------------------------------------------------------------------------
    @property
    def cfg(self) -> WanConfig:
        return self.program.cfg

    @property
    def pcfg(self) -> PipelineConfig:
        return self.program.pcfg

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.program.latent_hw)  # type: ignore[return-value]

    @property
    def layout(self) -> Layout:
        return self.program.layout

    @property
    def mesh(self) -> Mesh | None:
        """The mesh its programs compile for (None: one device)."""
        return self.program.layout.mesh

    @property
    def plan(self) -> Stagger:
        """Its stagger's table, the `Stagger` it steps by (the sequential stagger's for the block and
        Krea programs)."""
        if isinstance(self.program, TickProgram):
            return self.program.plan
        return make_stagger(SEQUENTIAL, self.pcfg.num_steps, clean_pass=self.pcfg.clean_pass)

    @property
    def in_flight(self) -> int:
        """Blocks in flight at once (1 for the sequential stagger)."""
        return self.plan.in_flight

    @property
    def devices(self) -> int:
        """Devices its steps run on."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def label(self) -> str:
        """One line saying what runs where, for logs and benches."""
        tokens = 1 if self.mesh is None else self.mesh.shape.get(TOKENS, 1)
        if self.stagger == SEQUENTIAL:
            text = "sequential"
            if self.kind == "krea":
                text += " (Krea's loop: context rebuilt per block)"
            elif self.pcfg.context == "rebuild":
                text += " (Krea's rules)"
            if self.kind == "tick" and tokens > 1:
                text += f", context parallel on {tokens} devices"
        else:
            text = f"{self.stagger} {self.mask}, {self.in_flight} blocks in flight on {tokens} device(s)"
        if model_size(self.mesh) > 1:
            text += f" x {model_size(self.mesh)} (tensor parallel)"
        return text

    @property
    def tick_program(self) -> TickProgram:
        """The cascade's tick program (its `init_state`, `prefill`, `spec`), for benches and tests
        that build a tick's state by hand; refused for the one-block programs."""
        if not isinstance(self.program, TickProgram):
            raise ValueError(f"this runner ({self.label}) runs program {self.kind!r}, not the cascade's tick")
        return self.program

    @property
    def block_program(self) -> BlockProgram:
        """The sequential stagger's fused block program (its `init_cache`, `prefill`), for benches
        and tests that build a cache by hand; refused for the others."""
        if not isinstance(self.program, BlockProgram):
            raise ValueError(f"this runner ({self.label}) runs program {self.kind!r}, not the fused block")
        return self.program

    @property
    def keeps_cache(self) -> bool:
        """False: no cache a recache policy could rewrite (Krea's loop); such a policy is refused at start."""
        return self.program.keeps_cache

    @property
    def takes_round_trip(self) -> bool:
        """True: `reencode=` takes Krea's VAE round trip for R (Krea's loop); the others refuse one."""
        return self.kind == "krea"

    @property
    def takes_source(self) -> bool:
        """True: `source=` (video-to-video input latents) is accepted: the one-block-per-step programs."""
        return self.kind != "tick"

    # -- placement ---------------------------------------------------------------------------
    def text_kv(self, params, embeddings) -> KV:
        """Prompt embeddings [B, Lt, text_dim] -> per-layer cross-attention K/V (`bcjax.model.text_kv`),
        computed where the steps read them (split by heads over `model` under tensor parallelism)."""
        return self.layout.text_kv(params, embeddings)

    def place_params(self, params):
        """DiT params where the steps compute (split over `model`, replicated over `tokens`)."""
        return self.layout.place_params(params)

    def place_text(self, text: KV) -> KV:
        """Text K/V where the steps read them (split by heads over `model`)."""
        return self.layout.place_text(text)

    def replicate(self, tree):
        """Leaves replicated over the mesh (global arrays over several processes); without a mesh,
        device arrays on the default device."""
        return self.layout.replicate(tree)

    # -- compiled programs for given inputs (benches, compile-only targets) --------------------
    def abstract_inputs(self, batch: int = 1) -> tuple:
        """The inputs of one step as ShapeDtypeStructs placed as the step takes them; nothing is
        allocated (works in a compile-only process). Pass them to `lower`."""
        return self.program.abstract_inputs(batch)

    def lower(self, *inputs, num_ticks: int | None = None) -> jax.stages.Lowered:
        """One step lowered for `inputs` (concrete or `abstract_inputs`); `.compile()` gives the
        executable. num_ticks: the cascade's whole-generation scan of that many ticks instead."""
        if num_ticks is not None:
            return self.tick_program.lower_scan(num_ticks, *inputs)
        return self.program.lower(*inputs)

    def step_inputs(self, params, text: KV, state: StepState) -> tuple:
        """The inputs the next `step` passes its compiled program: what `lower` takes, so that
        `lower(*step_inputs(...)).compile()` gives the very executable a step runs (`bcjax tune`
        times it without compiling twice). Its first output is the next state's carry
        (`state._replace(carry=out[0], step=state.step + 1)`); the carry is donated."""
        if isinstance(self.program, KreaProgram):
            raise ValueError("Krea's loop runs host work (its rebuilt context) between compiled calls: time it "
                             "through `step`")
        return self.program.step_inputs(params, text, state)

    # -- running ------------------------------------------------------------------------------
    def start(self, params, text: KV, key, *, num_blocks: int | None = None, context=None, source=None,
              reencode: Callable | None = None) -> StepState:
        """A stream before its first step.

        num_blocks: blocks to make; None: until the caller stops (absolute positions: until the
        RoPE table ends). context: given clean frames [B, G * block_frames, H, W, C] (an image,
        a video to continue), written under `text`; generation starts at block G. source:
        video-to-video input latents [B, num_blocks * block_frames, H, W, C] (block and Krea
        programs). reencode: Krea's VAE round trip (x0 -> R [B, 1, H, W, C]), Krea's loop only."""
        if reencode is not None and not self.takes_round_trip:
            raise ValueError(f"reencode (Krea's VAE round trip for R) is Krea's loop's; this runner is {self.label} "
                             "(its clean-pass cache, or in Krea's mode the latent frame, stands where R would)")
        if source is not None and not self.takes_source:
            raise ValueError(f"source (video-to-video) runs one block per step; this runner is {self.label}: "
                             "use stagger 'sequential'")
        return self.program.start(params, text, key, num_blocks=num_blocks, context=context, source=source,
                                  reencode=reencode)

    def step(self, params, text: KV, state: StepState) -> tuple[StepState, Step]:
        """One step under `text` (one compiled call; the state's device buffers are donated): a
        whole block for the sequential programs, one tick for a cascade."""
        return self.program.step(params, text, state)

    def entering(self, state: StepState) -> int:
        """The newest block the next step works on: its prompt is the one in force for that step."""
        return self.program.entering(state)

    def done(self, state: StepState) -> bool:
        return self.program.done(state)

    def cache(self, state: StepState):
        """The stream's KV cache (a recache at a prompt switch reads and replaces it)."""
        return self.program.cache(state)

    def with_cache(self, state: StepState, cache) -> StepState:
        return self.program.with_cache(state, cache)

    def blocks(self, params, text: KV, key, *, num_blocks: int | None = None, context=None, source=None,
               reencode: Callable | None = None) -> Iterator[Block]:
        """Yield each block (id, x0 [B, block_frames, H, W, C]) as soon as it is finished; the
        arguments are `start`'s. num_blocks None streams until the caller stops."""
        params, text = self.place_params(params), self.place_text(text)
        state = self.start(params, text, key, num_blocks=num_blocks, context=context, source=source,
                           reencode=reencode)
        while not self.done(state):
            state, out = self.step(params, text, state)
            if out.block >= 0:
                assert out.x0 is not None  # a finished block comes with its latents
                yield Block(out.block, out.x0)

    def generate(self, params, text: KV, key, *, num_blocks: int, context=None, source=None,
                 reencode: Callable | None = None) -> jax.Array:
        """Latents [B, num_blocks * block_frames, H, W, C] (after the given `context`, if any);
        the arguments are `start`'s. A cascade runs the whole stagger as one compiled scan."""
        if isinstance(self.program, TickProgram) and source is None and reencode is None:
            return self.program.generate(params, text, key, num_blocks=num_blocks, context=context)
        return jnp.concatenate([b.x0 for b in self.blocks(params, text, key, num_blocks=num_blocks, context=context,
                                                          source=source, reencode=reencode)], axis=1)


def choose_program(pcfg: PipelineConfig, stagger: str | int, mesh: Mesh | None) -> Program:
    """The program a stagger runs by default: a cascade's tick; for the sequential stagger the
    fused block on one `tokens` device (Krea's loop for Krea's rebuilt context), the tick's
    sequential stagger on several (context parallelism: each pass's tokens split over `tokens`)."""
    if stagger != SEQUENTIAL:
        return "tick"
    if pcfg.context == "rebuild":
        return "krea"  # its VAE round trip needs the block on the host between blocks: one device
    if mesh is not None and mesh.shape.get(TOKENS, 1) > 1:
        return "tick"
    return "block"


def make_runner(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], stagger: str | int = SEQUENTIAL,
                mask: Mask = DEFAULT_MASK, mesh: Mesh | None = None, *, program: Program | None = None,
                token_group: int | None = None, schedule: str | int | None = None,
                window: Mask | None = None, adapter=None) -> Runner:
    """The runner for a sampler (`pcfg`), latent size, stagger and mask on `mesh`: the only
    constructor of one.

    stagger: `bcjax.names.STAGGERS`, any "P<k>"/"P<k>-no-clean", or an int stride. mask:
    `bcjax.names.MASKS`, what the in-flight blocks of a tick see of each other (ignored by the
    sequential stagger: one block in flight). mesh: a ('tokens', 'model') mesh (`make_mesh`); None:
    one device. program: force one of `bcjax.names.PROGRAMS` ("tick" runs the sequential stagger as
    the cascade does; "block" runs Krea's rules with the clean-pass machinery); None:
    `choose_program`. token_group: tokens per group of the tick's `tokens` split
    (`bcjax.cascade.tokens`); None: the least padding. adapter: a `bcjax.adapt.Adapter` made for
    this model, sampler, stagger and mask (anything else is refused, naming the field), run by the
    cascade's tick only; the sequential stagger is what it was trained to reproduce and runs
    without it (its output is the same with or without). schedule, window: the old names of
    stagger and mask (deprecated)."""
    stagger = renamed_keyword("schedule", "stagger", schedule, SEQUENTIAL, stagger)
    mask = renamed_keyword("window", "mask", window, DEFAULT_MASK, mask)
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r}: expected one of {MASKS}")
    kind = program or choose_program(pcfg, stagger, mesh)
    if kind not in PROGRAMS:
        raise ValueError(f"program {kind!r}: expected one of {PROGRAMS}")
    if kind != "tick" and stagger != SEQUENTIAL:
        raise ValueError(f"program {kind!r} runs the sequential stagger only; stagger {stagger!r} is a cascade's "
                         "(program 'tick')")
    if mesh is not None and TOKENS not in mesh.shape:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} have no {TOKENS!r} axis (bcjax.runners.make_mesh makes one)")
    check_latents(cfg, jax.ShapeDtypeStruct((1, 1, *latent_hw, cfg.in_channels), jnp.float32))
    if pcfg.positions == "rolling":
        pcfg.rope_period(cfg.rope_max_positions)  # validates the table against the cache window
    # weights split over `model` (checks that it divides heads and FFN before anything compiles);
    # the one-block programs use a `tokens` axis only for replicas
    layout = Layout(cfg, mesh) if kind == "tick" else Layout.split_only(cfg, mesh)
    cfg = layout.resolve(cfg)  # attention for the mesh's platform, not the process default
    hw = (int(latent_hw[0]), int(latent_hw[1]))
    if stagger == SEQUENTIAL:
        adapter = None  # the teacher: the base weights by construction
    elif adapter is not None:
        adapter.check(cfg, pcfg, stagger, mask)
    prog: TickProgram | BlockProgram | KreaProgram
    if kind == "tick":
        prog = TickProgram(cfg, pcfg, hw, layout, stagger, mask, token_group, adapter)
    elif kind == "block":
        prog = BlockProgram(cfg, pcfg, hw, layout)
    else:
        prog = KreaProgram(cfg, pcfg, hw, layout)
    return Runner(prog, kind, stagger, mask if stagger != SEQUENTIAL else "causal")


def generate(cfg: WanConfig, params, prompt, key, *, num_blocks: int, pcfg: PipelineConfig | None = None,
             latent_hw: tuple[int, int] = (60, 104), stagger: str | int = "P4", mask: Mask = DEFAULT_MASK,
             mesh: Mesh | None = None, context=None, schedule: str | int | None = None,
             window: Mask | None = None) -> jax.Array:
    """One-call generation; `make_runner` to reuse the compiled program or to stream.

    prompt: umT5 prompt embeddings [B, text_len, text_dim], or their `text_kv` K/V. schedule,
    window: the old names of stagger and mask (deprecated).
    Returns latents [B, num_blocks * block_frames, H, W, C]."""
    stagger = renamed_keyword("schedule", "stagger", schedule, "P4", stagger)
    mask = renamed_keyword("window", "mask", window, DEFAULT_MASK, mask)
    runner = make_runner(cfg, pcfg or PipelineConfig(), latent_hw, stagger, mask, mesh)
    text = prompt if isinstance(prompt, KV) else text_kv(cfg, params, prompt)
    return runner.generate(params, text, key, num_blocks=num_blocks, context=context)
