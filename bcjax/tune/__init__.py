"""Measured choice of schedule, token group and attention kernel on the user's own devices.

`bcjax tune` times every candidate and stores the winner (`measure`, `store`); runs given
`--stagger auto` / `--attention auto` use it, or the model's prediction when these devices were
never tuned (`auto`).

    from bcjax.tune import resolve
    choice = resolve(cfg, pcfg, latent_hw, mask, mesh, stagger="auto", attention="auto")
"""

from bcjax.tune.auto import AUTO, Choice, resolve
from bcjax.tune.store import TuneKey, lookup

__all__ = ["AUTO", "Choice", "TuneKey", "lookup", "resolve"]
