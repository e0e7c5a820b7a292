"""Makes torch, diffusers and transformers unimportable in this interpreter and in every Python
subprocess that inherits PYTHONPATH (`.ci/test` puts this folder on it): the suite then runs as
in an environment where the `convert` extra is not installed, without a second venv."""

import sys

_BLOCKED = {"torch", "torchvision", "torchaudio", "diffusers", "transformers"}


class _NoTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by .ci/no_torch)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
