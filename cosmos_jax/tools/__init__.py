"""The command line tools (`python tools/<name>.py`, or the `cosmos-jax-*` console scripts), one module each."""
