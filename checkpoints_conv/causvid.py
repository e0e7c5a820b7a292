"""CausVid checkpoints (tianweiy/CausVid, `checkpoint_model_XXXXXX/model.pt`) -> bcjax.

Layout: `causvid/train_distillation.py` `Trainer.save` writes `{"generator": ..., "critic": ...}`
(no EMA), each a state dict of `causvid/models/wan/wan_wrapper.py` `CausalWanDiffusionWrapper`,
whose weights are `self.model = CausalWanModel.from_pretrained(...)`: keys are `model.` + the
original Wan2.1 layout. `minimal_inference/autoregressive_inference.py` loads `['generator']`;
the older image-to-video script reads `['model']`, accepted as a fallback. (Read from
GoatWu/CausVid-Plus, a fork of tianweiy/CausVid, and tianweiy/CausVid's i2v script.)
"""

from __future__ import annotations

from bcjax.model.config import WanConfig
from checkpoints_conv import wan as wan_conv
from checkpoints_conv.self_forcing import generator_state_dict


def convert(path_or_state, cfg: WanConfig, *, ema: bool = False):
    """A CausVid `model.pt` (path, or its loaded dict) -> bcjax parameter tree.

    ema: CausVid's trainer saves no EMA, so `generator` (or `model`) is read unless ema=True.
    """
    return wan_conv.convert(generator_state_dict(path_or_state, ema=ema, layout="CausVid", fallbacks=("model",)), cfg)
