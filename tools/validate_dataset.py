"""`python tools/validate_dataset.py ...` (`--help` for its flags): runs cosmos_jax/tools/validate_dataset.py from a clone.

The command lives in the package (pyproject.toml installs some as `cosmos-jax-*` console scripts); `from tools import validate_dataset` imports that module.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cosmos_jax.tools.validate_dataset import cli

    cli()
else:
    from cosmos_jax.tools import validate_dataset as _impl

    sys.modules[__name__] = _impl
