"""The install itself: no name headlab puts on the path shadows a dependency; hub kernels never bypass the seam.

transformers >= 5.25 imports Hugging Face's `kernels` distribution whenever it loads a model. headlab's own
kernels once lived in a top-level package called `kernels`, so any process with the checkout on `sys.path`
(`python -m pytest`, a notebook started in the checkout) imported ours instead and every model load failed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import headlab as hl

ROOT = Path(__file__).resolve().parents[1]
# every folder of the checkout that ends up first on sys.path in some supported way of running things:
# the root (python -m ..., notebooks started there), tests/ (pytest's rootdir insertion), scripts/, benchmarks/,
# notebooks/, apps/ (python <dir>/<file>.py), and kernels/ (where headlab_kernels lives)
PATH_DIRS = [ROOT, *(ROOT / d for d in ("tests", "scripts", "benchmarks", "notebooks", "apps", "kernels"))]
OWN = {"headlab", "headlab_kernels"}


def _top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for f in dist.files or ():
        first = f.parts[0]
        if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__") or first.startswith("_"):
            continue
        names.add(first.removesuffix(".py") if len(f.parts) == 1 else first)
    return {n for n in names if n.isidentifier()}


def test_no_name_in_the_checkout_shadows_an_installed_distribution():
    clashes = []
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "headlab":
            continue
        for name in _top_level_names(dist) - OWN:
            for folder in PATH_DIRS:
                spec = importlib.machinery.PathFinder.find_spec(name, [str(folder)])
                # a namespace portion (a folder without __init__.py) has no origin and loses to any regular package
                if spec is not None and spec.origin not in (None, "namespace"):
                    clashes.append(f"{dist.metadata['Name']} imports as {name!r}, but {spec.origin} would win")
    assert not clashes, "\n".join(clashes)


def test_kernels_is_not_a_package_in_the_checkout():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "headlab_kernels" / "__init__.py").exists()


def test_repository_root_on_sys_path_imports_hf_kernels_and_ours():
    """`python -c` started in the checkout puts it first on sys.path, as `python -m pytest` does."""
    code = ("import importlib.util, kernels, headlab_kernels.head_stats as h; "
            "print(getattr(kernels, '__file__', None)); print(h.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    hf_kernels, ours = out.stdout.split()
    if importlib.util.find_spec("kernels") is not None and _dist_installed("kernels"):
        assert hf_kernels != "None" and not Path(hf_kernels).resolve().is_relative_to(ROOT / "kernels"), hf_kernels
    assert Path(ours).resolve().is_relative_to(ROOT / "kernels" / "headlab_kernels")


def _dist_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _assert_seam_sees_every_call(m: hl.HeadModel, prompt) -> None:
    """Every attention module's call goes through the seam: captured once per layer, and an edit reaches it."""
    assert not getattr(m.hf, "use_kernels", False), "hub kernels are on"
    run = m.run(prompt, heads=m.heads())
    assert sorted(run.records) == list(range(m.n_layers))
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.out_proj(layer).register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.__setitem__(layer, args[0].detach().clone()))
        for layer in range(m.n_layers)]
    try:
        with hl.edit(m, [hl.Ablate(h) for h in m.heads()]):
            m.run(prompt)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == list(range(m.n_layers))
    for layer, x in seen.items():
        assert torch.count_nonzero(x) == 0, f"layer {layer}: zero-ablating every head left its output non-zero"


BUNDLED_FAST = [n for n in hl.BUNDLED if n != "smollm2-135m"]


@pytest.mark.parametrize("name", BUNDLED_FAST)
def test_seam_sees_every_attention_call_on_bundled_models(name):
    m = hl.load(name, device="cpu")
    prompt = "The cat sat on the mat." if m.tokenizer is not None else [[1, 5, 9, 2, 7, 5, 9, 2]]
    _assert_seam_sees_every_call(m, prompt)


@pytest.mark.slow
def test_seam_sees_every_attention_call_on_smollm2():
    m = hl.load("smollm2-135m", device="cpu")
    _assert_seam_sees_every_call(m, "The cat sat on the mat. The cat")


def test_a_kernelized_model_object_is_reset_to_torch_layers(tmp_path):
    """transformers' default `use_kernels` kernelizes a model; headlab puts transformers' own forwards back."""
    cfg = T.LlamaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    hf = T.LlamaForCausalLM.from_pretrained(tmp_path)  # transformers' defaults
    plain = T.LlamaForCausalLM.from_pretrained(tmp_path, use_kernels=False)
    ids = torch.tensor([[1, 5, 9, 2, 7, 5, 9, 2]])
    with torch.no_grad():
        expected = plain(ids).logits
    if getattr(hf, "use_kernels", False):
        with pytest.warns(UserWarning, match="hub kernels"):
            m = hl.load(hf, device="cpu")
    else:  # a transformers release without hub kernels on by default
        m = hl.load(hf, device="cpu")
    _assert_seam_sees_every_call(m, ids.tolist())
    assert torch.equal(m.run(ids.tolist()).logits, expected)
