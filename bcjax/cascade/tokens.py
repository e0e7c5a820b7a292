"""How a tick's query tokens are spread over the `tokens` mesh axis.

A tick is one joint DiT pass over every block in flight: num_slots x block_frames latent frames
of tokens_per_frame tokens each, T tokens in all. The `tokens` devices split T, not the blocks:
each device takes an equal run of consecutive *groups*, a group being tokens_per_frame / k tokens
of one latent frame (k divides tokens_per_frame), so every group has one timestep and one row of
the attention mask. Padding groups (idle queries, keys nobody sees) are added only when the
groups do not divide over the devices. Hence any device count runs any stagger: P4's 5 blocks
use 2, 4, 5, 8 or 16 devices, and the sequential stagger's one block on N devices is context
parallelism of each pass.

Group size: the smallest padding wins, then the largest group (fewer mask rows and modulation
rows; kernel query blocks stay large). Groups are never cut below `min_group` tokens (unless a
frame is smaller): a tiny group makes tiny GEMMs and as many mask rows.
"""

from __future__ import annotations

from typing import NamedTuple

MIN_GROUP = 64  # tokens: at 480x832 (1560 tokens per frame) allows 65-token groups on 16 devices


class TokenSplit(NamedTuple):
    group: int  # tokens per group (divides tokens_per_frame)
    groups: int  # real groups of the tick: frames x tokens_per_frame / group
    per_device: int  # groups each device holds (the last devices' tail may be padding)
    devices: int

    @property
    def tokens(self) -> int:
        """Real tokens of the tick."""
        return self.groups * self.group

    @property
    def padded_tokens(self) -> int:
        """Tokens of the gathered pass, padding included: devices x per_device x group."""
        return self.devices * self.per_device * self.group

    @property
    def device_tokens(self) -> int:
        return self.per_device * self.group


def token_split(frames: int, tokens_per_frame: int, devices: int, group: int | None = None,
                min_group: int = MIN_GROUP) -> TokenSplit:
    """The split of `frames` x `tokens_per_frame` query tokens over `devices` (see module doc).

    group: force this group size (must divide tokens_per_frame), e.g. to test a fine split."""
    if frames < 1 or tokens_per_frame < 1 or devices < 1:
        raise ValueError(f"token_split needs frames, tokens_per_frame and devices >= 1; got {frames}, "
                         f"{tokens_per_frame}, {devices}")
    if group is not None:
        if group < 1 or tokens_per_frame % group:
            raise ValueError(f"token group {group} must divide tokens_per_frame = {tokens_per_frame}")
        sizes = [group]
    else:
        floor = min(min_group, tokens_per_frame)
        sizes = [g for g in range(tokens_per_frame, 0, -1) if tokens_per_frame % g == 0 and g >= floor]

    def plan(g):
        groups = frames * (tokens_per_frame // g)
        per_device = -(-groups // devices)
        return TokenSplit(g, groups, per_device, devices)

    # least padding first, then the largest group (sizes run largest first; min keeps the first)
    return min((plan(g) for g in sizes), key=lambda s: s.padded_tokens - s.tokens)
