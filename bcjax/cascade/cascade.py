"""Block Cascading: the tick compiled into one `lax.scan` per generation, or stepped for a stream.

Devices: a `Mesh` with a `tokens` axis and a `model` axis for tensor-parallel weights
(`bcjax.model.tensor_parallel`: heads and FFN split over `model`, one shard_map over both axes).
The `tokens` devices split each tick's tokens (`bcjax.cascade.tokens`), so any number of them runs
any stagger: P4's five blocks on 2, 4, 5, 8 or 16 devices, and the sequential stagger on N
devices is context parallelism of one block. With one device the whole tick is batched on it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bcjax.cascade.tick import CascadeState, TickSpec, tick
from bcjax.cascade.tokens import token_split
from bcjax.distributed import local, replicate
from bcjax.flags import renamed_keyword
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache
from bcjax.model.lora import LORA
from bcjax.model.tensor_parallel import Layout, check_model_axis, place
from bcjax.model.wan import KV
from bcjax.names import DEFAULT_MASK, MODEL, TOKENS, Mask
from bcjax.sampler import check_rebuild, clean_block, write_context
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.stagger import make_stagger, slot_state
from bcjax.stepping import Step, StepState, keeps_clean_cache

ENDLESS = np.iinfo(np.int32).max  # num_blocks of a stream with no planned end


def make_mesh(tokens: int | None = None, model: int = 1, devices=None, cfg: WanConfig | None = None, *,
              stage: int | None = None) -> Mesh:
    """A ('tokens', 'model') mesh; by default every device on `tokens`. Devices are laid out
    tokens-major, so a `model` group is `model` consecutive devices (the same host, the fastest
    links: its reductions run every sublayer, the `tokens` all-gather once per layer). cfg: checks
    that `model` divides its heads and FFN width. stage: the old name of `tokens` (deprecated).

    On a TPU slice that XLA:TPU needs used whole (a v5e slice of more than 16 chips, see
    `bcjax.targets`), the `tokens` axis grows so that tokens x model covers every chip: a cascade
    splits its tick's tokens over all of them (replicas for the sequential runners). A `model`
    that does not divide the slice is refused, saying why."""
    from bcjax.targets import whole_slice_required

    tokens = renamed_keyword("stage", "tokens", stage, None, tokens)

    devices = list(devices if devices is not None else jax.devices())
    if model < 1:
        raise ValueError(f"mesh axis 'model' = {model} must be >= 1")
    if cfg is not None:
        check_model_axis(cfg, model)
    if whole_slice_required(devices):
        n = len(devices)
        if n % model:
            raise ValueError(f"this TPU slice ({n} x {devices[0].device_kind}) must be used whole: XLA:TPU refuses a "
                             f"program on part of it (limited ICI routing), and 'model' = {model} does not divide {n}")
        if tokens is not None and tokens * model > n:
            raise ValueError(f"mesh ('tokens'={tokens}, 'model'={model}) needs {tokens * model} devices; {n} available")
        tokens = n // model  # the whole slice: the tick's tokens are split over every device
    tokens = tokens or len(devices) // model
    if tokens * model > len(devices):
        raise ValueError(f"mesh ('tokens'={tokens}, 'model'={model}) needs {tokens * model} devices; "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices[: tokens * model]).reshape(tokens, model), (TOKENS, MODEL))


@dataclasses.dataclass
class TickProgram:
    """The cascade's compiled tick for one model, sampler, latent size, stagger and mask on a
    layout's mesh, and the whole-generation scan of it: the "tick" program of a
    `bcjax.runners.Runner` (`make_runner` builds both; the checks common to every program are there)."""

    cfg: WanConfig  # resolved for the layout's platform
    pcfg: PipelineConfig
    latent_hw: tuple[int, int]
    layout: Layout
    # `bcjax.names.STAGGERS` (any P<k>, a stride); a "-no-clean" stagger, or a pcfg with
    # context="last-pass", has no clean stage: the last denoising pass writes the cache
    stagger: str | int = "P4"
    mask: Mask = DEFAULT_MASK
    # tokens per group of the `tokens` split (`bcjax.cascade.tokens`); None: the least padding
    token_group: int | None = None
    # a `bcjax.adapt.Adapter` (checked by make_runner): its factors ride with the params into the
    # tick (and only the tick: prefill and every other program run the base weights)
    adapter: Any = None

    def __post_init__(self):
        check_rebuild(self.pcfg, "the cascade")
        self.mesh = self.layout.mesh
        self._lora = None
        if self.adapter is not None:  # the factors split like the kernels they adapt (`lora_specs`)
            lora = jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.cfg.compute_dtype), self.adapter.lora)
            self._lora = lora if self.mesh is None else place(lora, self.mesh, self.layout.lora(lora))
        devices = 1 if self.mesh is None else self.mesh.shape[TOKENS]
        # the stagger's table (when each block enters, its stage at every tick)
        self.plan = make_stagger(self.stagger, self.pcfg.num_steps, clean_pass=self.pcfg.clean_pass)
        if not self.plan.clean_pass:  # a "-no-clean" stagger: the sampler's last-pass cache entry
            if self.pcfg.context == "rebuild":
                raise ValueError(f"stagger {self.stagger!r} has no clean stage, and Krea's rebuilt context "
                                 "(context='rebuild') is made by it: use a stagger with a clean pass")
            self.pcfg = dataclasses.replace(self.pcfg, context="last-pass")
        p = self.cfg.tokens_per_frame(*self.latent_hw)
        split = token_split(self.plan.num_slots * self.pcfg.block_frames, p, devices, self.token_group)
        self.spec = TickSpec(self.cfg, self.pcfg, self.plan, self.mask, self.latent_hw, split)
        self._step = self._distribute(partial(tick, self.spec))
        self._runs: dict[int, Callable] = {}

    # -- placement -------------------------------------------------------------------------
    def _distribute(self, fn) -> Any:  # a jitted function (its .lower compiles ahead)
        """fn(params, text, key, num_blocks, state[, axis]) jitted on the mesh (or batched, without
        one), the state donated. Nothing is placed on a device here: each device derives its slot
        ids from its `tokens` index, so the program lowers from abstract values alone."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=(4,))
        lay = self.layout
        # x whole on every device (see tick); a tree of PartitionSpecs shaped like the state
        state_spec = CascadeState(P(), lay.cache, P(), P())  # type: ignore[arg-type]  # specs, not arrays
        params_spec = lay.params
        if self._lora is not None:
            params_spec = {**params_spec, LORA: lay.lora(self._lora)}
        mapped = jax.shard_map(
            partial(fn, axis=TOKENS, model_axis=lay.axis), mesh=self.mesh,
            in_specs=(params_spec, lay.text, P(), P(), state_spec),
            out_specs=(state_spec, P()), check_vma=False,
        )
        return jax.jit(mapped, donate_argnums=(4,))

    # -- compiled programs for given inputs (benches, compile-only targets) -----------------
    def abstract_inputs(self, batch: int = 1) -> tuple:
        """(params, text, key, num_blocks, state) of one tick as ShapeDtypeStructs placed on the
        mesh as the tick takes them; nothing is allocated (works in a compile-only process)."""
        lay = self.layout
        x = jax.ShapeDtypeStruct((self.plan.num_slots, batch, *self.spec.block_shape), jnp.float32)
        cache = lay.abstract_cache(batch, self.pcfg.cache_frames, self.spec.tokens_per_frame)
        scalar = lay.abstract_scalar()
        state = CascadeState(lay.abstract(x, P()), cache, scalar, scalar)
        params = lay.abstract_params()
        if self._lora is not None:
            params = {**params, LORA: lay.abstract(self._lora, lay.lora(self._lora) if self.mesh is not None else None)}
        return params, lay.abstract_text(batch), lay.abstract_key(), scalar, state

    def lower(self, params, text: KV, key, num_blocks, state: CascadeState) -> jax.stages.Lowered:
        """One tick lowered for these inputs, concrete or abstract (`abstract_inputs`); `.compile()`
        gives the executable."""
        return self._step.lower(params, text, key, num_blocks, state)

    def lower_scan(self, num_ticks: int, params, text: KV, key, num_blocks, state: CascadeState) -> jax.stages.Lowered:
        """The whole-generation scan of num_ticks ticks, lowered as `lower` lowers one."""
        return self._run(num_ticks).lower(params, text, key, num_blocks, state)

    def init_state(self, batch: int, cache: KVCache | None = None, first_block: int = 0) -> CascadeState:
        """A cascade before its first tick; `cache` (e.g. from `prefill`) holds given context
        blocks, after which generation starts at block `first_block`."""
        x = jnp.zeros((self.plan.num_slots, batch, *self.spec.block_shape), jnp.float32)
        if cache is None:
            cache = self.layout.init_cache(batch, self.pcfg.cache_frames, self.spec.tokens_per_frame)
        state = CascadeState(x, cache, jnp.int32(0), jnp.int32(first_block))
        if self.mesh is not None:
            state = CascadeState(replicate(x, self.mesh), self.layout.place_cache(cache),
                                 *replicate(state[2:], self.mesh))
        return state

    def prefill(self, params, text: KV, frames) -> tuple[KVCache, int]:
        """(cache, first_block): given clean frames [B, G * block_frames, H, W, C] written to the
        cache by the sampler's clean pass at t = 0, block by block, as the sequential pipeline
        writes them (`bcjax.sampler.write_context`)."""
        params, text = self._placed(params, text)
        cache = self.layout.init_cache(frames.shape[0], self.pcfg.cache_frames, self.spec.tokens_per_frame)
        cache = write_context(self._context_fn, self.cfg, self.pcfg, self.latent_hw, params, text, frames, cache)
        return cache, frames.shape[1] // self.pcfg.block_frames

    @functools.cached_property
    def _context_fn(self) -> Callable:
        # jitted once per cascade (a prefill per stream must not recompile); on the mesh, split
        # over `model` and replicated over `tokens`, so its cache is where the tick reads it
        lay = self.layout
        w, t, c = lay.specs()
        return jax.jit(lay.shard_map(partial(clean_block, self.cfg, self.pcfg, timestep=0.0), (w, t, P(), c, P()), c),
                       donate_argnums=(3,))

    def _adapted(self, params):
        """Placed params as the tick takes them: with the adapter's factors, if any."""
        return params if self._lora is None else {**params, LORA: self._lora}

    def _placed(self, params, text):
        """params and text K/V on the mesh: replicated over `tokens`, split over `model` (global
        arrays when the mesh spans processes); a no-op for arrays already there and without a mesh."""
        return self.layout.place_params(params), self.layout.place_text(text)

    def _check_length(self, num_blocks: int, first_block: int = 0):
        self.pcfg.check_length(self.cfg.rope_max_positions, num_blocks, first_block)

    # -- whole generation: one scan ----------------------------------------------------------
    def _run(self, num_ticks: int):
        if num_ticks not in self._runs:
            self._runs[num_ticks] = self._distribute(partial(_scan_ticks, self.spec, num_ticks))
        return self._runs[num_ticks]

    def generate(self, params, text: KV, key, *, num_blocks: int, context=None) -> jax.Array:
        """Latents [B, num_blocks * block_frames, H, W, C]; the whole stagger runs as one scan.

        context: optional given clean frames [B, G * block_frames, H, W, C] (an image-to-video
        first block, a video to continue): prefilled into the cache, generation continues after.
        """
        st = self.plan
        params, text = self._placed(params, text)
        if context is None:
            state = self.init_state(text.k.shape[1])
        else:
            state = self.init_state(text.k.shape[1], *self.prefill(params, text, context))
        self._check_length(num_blocks, int(state.first_block))
        _, (emitted, _) = self._run(st.num_ticks(num_blocks))(self._adapted(params), text, key, jnp.int32(num_blocks),
                                                              state)
        emitted = local(emitted)  # several hosts: this process's replica
        ticks = np.asarray([st.emit_tick(b) for b in range(num_blocks)])
        return jnp.concatenate(list(emitted[ticks]), axis=1)

    # -- the stepping interface (bcjax.stepping): one tick per step ---------------------------
    keeps_cache = property(lambda self: keeps_clean_cache(self.pcfg))

    def start(self, params, text: KV, key, *, num_blocks: int | None = None, context=None, source=None,
              reencode=None) -> StepState:
        """A stream before its first tick (`Runner.start`; it has refused source and reencode)."""
        params, text = self._placed(params, text)
        batch = text.k.shape[1]
        carry = (self.init_state(batch) if context is None
                 else self.init_state(batch, *self.prefill(params, text, context)))
        return self._begin(carry, key, num_blocks)

    def _begin(self, carry: CascadeState, key, num_blocks: int | None) -> StepState:
        first = int(carry.first_block)
        if num_blocks is None:
            num_blocks = self.pcfg.stream_blocks(self.cfg.rope_max_positions, first)
        if num_blocks is not None:
            self._check_length(num_blocks, first)
        return StepState(carry, key, 0, first, num_blocks)

    def step(self, params, text: KV, state: StepState) -> tuple[StepState, Step]:
        """One tick under `text`: a joint pass over every block in flight (the state is donated).
        Emits the block that finished denoising this tick, if any (none while the cascade fills,
        and on stride - 1 of every stride ticks)."""
        st, tau = self.plan, state.step
        total = ENDLESS if state.num_blocks is None else state.num_blocks
        carry, (x0, _) = self._step(*self.step_inputs(params, text, state))
        blocks, stages, busy = slot_state(st, tau, np.arange(st.num_slots), total)
        in_flight = tuple(sorted((state.first_block + int(b), int(s))
                                 for b, s, u in zip(blocks, stages, busy, strict=True) if u))
        block = -1
        if tau >= st.emit_stage and (tau - st.emit_stage) % st.stride == 0:
            block = state.first_block + (tau - st.emit_stage) // st.stride
        return state._replace(carry=carry, step=tau + 1), Step(block, local(x0) if block >= 0 else None, in_flight)

    def step_inputs(self, params, text: KV, state: StepState) -> tuple:
        """(params, text, key, num_blocks, carry) of the next tick, placed: `lower`'s inputs."""
        params, text = self._placed(params, text)
        total = ENDLESS if state.num_blocks is None else state.num_blocks
        return self._adapted(params), text, state.key, jnp.int32(total), state.carry

    def entering(self, state: StepState) -> int:
        """The newest block in flight at the next tick: its prompt is the one in force for that
        tick (every in-flight block is computed under it)."""
        newest = state.step // self.plan.stride
        if state.num_blocks is not None:
            newest = min(newest, state.num_blocks - 1)
        return state.first_block + newest

    def done(self, state: StepState) -> bool:
        return state.num_blocks is not None and state.step > self.plan.emit_tick(state.num_blocks - 1)

    def cache(self, state: StepState) -> KVCache:
        return state.carry.cache

    def with_cache(self, state: StepState, cache: KVCache) -> StepState:
        return state._replace(carry=state.carry._replace(cache=cache))


def _scan_ticks(spec: TickSpec, num_ticks: int, params, text, key, num_blocks, state, axis=None, model_axis=None):
    def body(state, _):
        return tick(spec, params, text, key, num_blocks, state, axis, model_axis)

    return jax.lax.scan(body, state, None, length=num_ticks)

