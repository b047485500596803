"""Framework front ends (``upgd_ref.adapters.<framework>``).

Adapters move arrays to and from the core through DLPack and contain no math. The PyTorch,
JAX and TensorFlow adapters are separate modules added by their own issues; this package
exists so that ``upgd_ref.adapters`` is importable and installed from the top-level
``adapters/`` folder (see ``pyproject.toml``).
"""
