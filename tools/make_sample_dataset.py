"""`python tools/make_sample_dataset.py ...` (`--help` for its flags): runs cosmos_jax/tools/make_sample_dataset.py from a clone.

The command lives in the package (pyproject.toml installs some as `cosmos-jax-*` console scripts); `from tools import make_sample_dataset` imports that module.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cosmos_jax.tools.make_sample_dataset import cli

    cli()
else:
    from cosmos_jax.tools import make_sample_dataset as _impl

    sys.modules[__name__] = _impl
