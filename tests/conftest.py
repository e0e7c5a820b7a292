import os

# Five fake CPU devices for the cascade's mesh tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the suite does not read or fill the user's persistent compile cache (test_compile_cache turns it on)
os.environ["BCJAX_COMPILE_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402

from bcjax.model import WanConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    return WanConfig.preset("tiny", attention="xla")


@pytest.fixture(scope="session")
def wan_sd(tiny_cfg):
    torch_oracle = pytest.importorskip("torch_oracle")
    return torch_oracle.random_wan_state_dict(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg, wan_sd):
    from torch_oracle import to_numpy

    from checkpoints_conv import wan as wan_conv

    return jax.tree_util.tree_map(jax.numpy.asarray, wan_conv.convert(to_numpy(wan_sd), tiny_cfg))


@pytest.fixture(scope="session")
def oracle(tiny_cfg, wan_sd):
    from torch_oracle import DiffusersWan

    return DiffusersWan(tiny_cfg, wan_sd)
