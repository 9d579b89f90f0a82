"""`python tools/render_control.py ...` (`--help` for its flags): runs cosmos_jax/tools/render_control.py from a clone.

The command lives in the package (pyproject.toml installs some as `cosmos-jax-*` console scripts); `from tools import render_control` imports that module.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cosmos_jax.tools.render_control import cli

    cli()
else:
    from cosmos_jax.tools import render_control as _impl

    sys.modules[__name__] = _impl
