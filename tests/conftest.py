import os

import shared

# The suite's XLA flags (tests/shared.py: 10 fake CPU devices, LLVM optimisation off), appended to the
# user's XLA_FLAGS (set, even empty, they would otherwise leave the suite one device); a flag the user
# set wins. Before jax initialises.
os.environ["XLA_FLAGS"] = shared.xla_flags(base=os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the suite does not read or fill the user's persistent compile cache (test_compile_cache turns it on)
os.environ["BCJAX_COMPILE_CACHE"] = "off"

import jax
import pytest

from bcjax.model import WanConfig, init_params

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _after_each_test():
    """Servers a serve test started for itself are shut down after it (tests/serve_helpers.py)."""
    yield
    import sys

    helpers = sys.modules.get("serve_helpers")
    if helpers is not None:
        helpers.stop_started()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each module, its runners and compiled programs go (tests/shared.py `release`: one
    process holds a bounded number of memory maps)."""
    yield
    shared.release()


@pytest.fixture(scope="session")
def tiny_cfg():
    return WanConfig.preset("tiny", attention="xla")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    """Random tiny DiT parameters from bcjax's own init: no torch, so every test but the parity
    tests runs without it. Flax initialises biases to zero and norm scales to one; they are
    perturbed to the statistics of the oracle's state dict (biases ~ 0.02 N(0, 1), scales
    1 + 0.1 N(0, 1)), so a bias or a norm scale that is dropped or misapplied still moves outputs."""
    params = init_params(tiny_cfg, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))

    def perturb(path, a, k):
        name = jax.tree_util.keystr(path[-1:])
        if "bias" in name:
            return a + 0.02 * jax.random.normal(k, a.shape, a.dtype)
        if "scale" in name:
            return a + 0.1 * jax.random.normal(k, a.shape, a.dtype)
        return a

    return treedef.unflatten([perturb(path, a, k) for (path, a), k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="session")
def wan_sd(tiny_cfg):
    torch_oracle = pytest.importorskip("torch_oracle")
    return torch_oracle.random_wan_state_dict(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def torch_tiny_params(tiny_cfg, wan_sd):
    """The oracle's random state dict converted to bcjax (parity tests: the same weights on both sides)."""
    from torch_oracle import to_numpy

    from checkpoints_conv import wan as wan_conv

    return jax.tree_util.tree_map(jax.numpy.asarray, wan_conv.convert(to_numpy(wan_sd), tiny_cfg))


@pytest.fixture(scope="session")
def oracle(tiny_cfg, wan_sd):
    from torch_oracle import DiffusersWan

    return DiffusersWan(tiny_cfg, wan_sd)
