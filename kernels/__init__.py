"""headlab's compute kernels: each op keeps a pure-torch reference beside its Triton kernel.

Kept import-light on purpose: transformers probes for a package named `kernels` (the Hugging Face
kernel hub) and may import this one, so nothing here imports triton or torch.
"""
