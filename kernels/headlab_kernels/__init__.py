"""headlab's compute kernels: each op keeps a pure-torch reference beside its Triton kernel.

The folder on disk is the top-level `kernels/` (as the layout asks), but the import name is
`headlab_kernels`: a top-level package named `kernels` would shadow Hugging Face's `kernels`
distribution, which transformers (>= 5.25) imports when it loads a model. `kernels/` itself has no
`__init__.py`, so the repository root on `sys.path` (as under `python -m pytest`) cannot bring the
collision back: a folder without `__init__.py` loses to a regular package of the same name.
"""
