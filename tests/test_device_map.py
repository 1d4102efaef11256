"""Models across devices: `hl.load(..., device_map=..., max_memory=..., offload_folder=...)` through accelerate.

This machine has only a CPU, so the maps put some layers on "cpu" and some on "disk" (weights left on the meta
device and read from the offload folder / the checkpoint at each forward, through accelerate's hooks), and one
model is meta-initialised and filled by `accelerate.load_checkpoint_and_dispatch`. Every check compares with the
same folder loaded on one device (`hl.load(folder, device="cpu")`): logits, every layer's patterns, the streaming
statistics, edits (Ablate zero / mean, Scale, Patch) and a KV-cache decode step; the measured max abs differences
are printed at the end. Bad maps are HeadlabErrors naming the device or module.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import headlab as hl
from headlab.errors import HeadlabError
from headlab.models.placement import check_device, input_device
from tests.conftest import tiny_config

ATOL = 1e-5
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print("\ndevice maps vs one device: max abs differences (float32)")
        for name, err in sorted(ERRORS.items()):
            print(f"  {name:55s} {err:.3e}")


def _err(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference where both are finite; inf if their non-finite entries (-inf lse of padded rows, NaN
    statistics not asked for) are not the same."""
    a, b = a.detach().float(), b.detach().float()
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):
        return float("inf")
    err = float((a[finite] - b[finite]).abs().max()) if bool(finite.any()) else 0.0
    ERRORS[name] = max(ERRORS.get(name, 0.0), err)
    return err


LLAMA_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
             "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "disk"}
GPT2_MAP = {"transformer.wte": "cpu", "transformer.wpe": "disk", "transformer.h.0": "cpu", "transformer.h.1": "disk",
            "transformer.ln_f": "disk", "lm_head": "cpu"}
MAPS = {"llama": LLAMA_MAP, "gpt2": GPT2_MAP}
IDS = [[5, 9, 2, 17, 9, 2, 17, 30, 4, 11, 5, 9], [7, 3, 3, 21, 8]]  # padded batch: the second item is shorter


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_folder, tmp_path_factory):
    family = request.param
    folder = tiny_folder(family)
    single = hl.load(folder, device="cpu")
    spread = hl.load(folder, device_map=MAPS[family], offload_folder=tmp_path_factory.mktemp("offload"))
    return family, single, spread


def test_the_map_is_applied(pair):
    family, single, spread = pair
    assert spread.device_map == MAPS[family]
    assert single.device_map is None
    assert spread.device == torch.device("cpu") == input_device(spread.hf)
    # the layers mapped to "disk" hold no weights in memory: they are read at each forward
    disk = [name for name, dev in MAPS[family].items() if dev == "disk"]
    for name, param in spread.hf.named_parameters():
        on_disk = any(name.startswith(d + ".") for d in disk)
        assert (param.device.type == "meta") == on_disk, name
    assert "cpu" in repr(spread)


def test_run_patterns_and_logits_equal_the_single_device_run(pair):
    family, single, spread = pair
    a, b = single.run(IDS, with_z=True), spread.run(IDS, with_z=True)
    assert sorted(b.records) == list(range(spread.n_layers))
    assert _err(f"{family}: logits", a.logits, b.logits) <= ATOL
    for layer in range(single.n_layers):
        assert b.patterns(layer).device == spread.device
        assert _err(f"{family}: patterns", a.patterns(layer), b.patterns(layer)) <= ATOL
        assert _err(f"{family}: z", a.records[layer].z, b.records[layer].z) <= ATOL
    # the short item's padded keys get no attention, its real rows sum to one
    assert torch.allclose(b.patterns(0)[1, :, :5].sum(-1), torch.ones(spread.n_heads, 5))
    assert float(b.patterns(0)[1, :, :, 5:].abs().max()) == 0.0


@pytest.mark.parametrize("statistics", ["all", "lse"])
def test_streaming_stats_equal(pair, statistics):
    family, single, spread = pair
    a = single.stats(IDS, topk=2, statistics=statistics)
    b = spread.stats(IDS, topk=2, statistics=statistics)
    assert a.paths == b.paths
    for layer in range(single.n_layers):
        sa, sb = a.layers[layer], b.layers[layer]
        assert _err(f"{family}: stats lse ({statistics})", sa.lse, sb.lse) <= ATOL
        if statistics == "all":
            assert torch.equal(sa.topk_idx, sb.topk_idx)
            assert _err(f"{family}: stats entropy", sa.entropy, sb.entropy) <= ATOL
            assert _err(f"{family}: stats received", sa.received, sb.received) <= ATOL


def test_edits_equal(pair):
    family, single, spread = pair
    edits = [hl.Ablate(hl.HeadRef(0, 1)), hl.Scale(hl.HeadRef(1, 3), factor=0.25),
             hl.Ablate(hl.HeadRef(1, 0), how="mean", reference=IDS)]
    clean = single.forward(IDS).logits
    with hl.edit(single, edits):
        a = single.forward(IDS).logits
    with hl.edit(spread, edits):
        b = spread.forward(IDS).logits
    assert float((a - clean).abs().max()) > 1e-3, "the edits changed nothing: the parity would be vacuous"
    assert _err(f"{family}: edited logits (zero, scale, mean)", a, b) <= ATOL
    # activation patching: a head's z from another prompt, at one position
    source = single.run([[4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42]], layers=[0], with_z=True)
    z = source.records[0].z[:, :, 2]  # [1, T, D]
    positions = torch.zeros(1, 12, dtype=torch.bool)
    positions[0, 7] = True
    patch = [hl.Patch(hl.HeadRef(0, 2), z=z, positions=positions)]
    with hl.edit(single, patch):
        a = single.forward(IDS[:1]).logits
    with hl.edit(spread, patch):
        b = spread.forward(IDS[:1]).logits
    assert float((a - single.forward(IDS[:1]).logits).abs().max()) > 1e-4
    assert _err(f"{family}: patched logits", a, b) <= ATOL


def test_forward_cached_decoding_equal(pair):
    family, single, spread = pair
    ids = torch.tensor([IDS[0]])
    with torch.no_grad(), hl.edit(single, [hl.Ablate(hl.HeadRef(1, 1))]):
        _, cache_a = single.forward_cached(ids[:, :8])
        step_a, _ = single.forward_cached(ids[:, 8:9], cache_a)
    with torch.no_grad(), hl.edit(spread, [hl.Ablate(hl.HeadRef(1, 1))]):
        with spread.capturing(layers=[1]) as cap:
            _, cache_b = spread.forward_cached(ids[:, :8])
            step_b, _ = spread.forward_cached(ids[:, 8:9], cache_b)
    assert cap.records[1].q.shape[2] == 1 and cap.records[1].k.shape[2] == 9  # the decode step saw the cache
    assert _err(f"{family}: decode step logits (edited)", step_a, step_b) <= ATOL


def test_records_are_gathered_on_the_capture_device(tiny_folder):
    """The seam moves each record (q, k, v, z, fused statistics) to `Capture.device` when the layer ran elsewhere —
    what HeadModel asks for on a model spread over devices. With only a CPU here, the target is the meta device (a
    real move: every tensor of the record changes device, shapes and dtypes kept)."""
    from headlab.capture import Capture, activate

    model = hl.load(tiny_folder("llama"), device="cpu")
    batch = model.encode(IDS)
    plain = Capture(with_z=True, with_lse=True, fused_stats=frozenset({"entropy"}))
    gathered = Capture(with_z=True, with_lse=True, fused_stats=frozenset({"entropy"}), device=torch.device("meta"))
    with activate(model.owner, capture=plain), activate(model.owner, capture=gathered), torch.no_grad():
        model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for layer, record in gathered.records.items():
        ref = plain.records[layer]
        for name in ("q", "k", "v", "z", "mask", "lse"):
            moved, here = getattr(record, name), getattr(ref, name)
            assert moved.device.type == "meta" and here.device.type == "cpu", name
            assert moved.shape == here.shape and moved.dtype == here.dtype, name
        assert record.fused["entropy"].device.type == "meta"


def test_layer_inputs_resume_equal(pair):
    """Exact patching's replay (LayerInputs.resume) runs the placed layers through accelerate's hooks."""
    family, single, spread = pair
    a, b = single.layer_inputs(IDS), spread.layer_inputs(IDS)
    for start in range(single.n_layers):
        assert _err(f"{family}: LayerInputs.resume", a.resume(start, copies=2), b.resume(start, copies=2)) <= ATOL


def test_automatic_map_with_max_memory_offloads(tiny_folder, tmp_path):
    """"sequential" with a CPU budget smaller than the model: accelerate puts what does not fit on disk."""
    folder = tiny_folder("llama")
    single = hl.load(folder, device="cpu")
    size = sum(p.numel() * p.element_size() for p in single.hf.parameters())
    spread = hl.load(folder, device_map="sequential", max_memory={"cpu": int(0.7 * size)}, offload_folder=tmp_path)
    assert "disk" in spread.device_map.values() and "cpu" in spread.device_map.values()
    a, b = single.run(IDS), spread.run(IDS)
    assert _err("llama: logits (sequential, max_memory)", a.logits, b.logits) <= ATOL
    for layer in range(single.n_layers):
        assert _err("llama: patterns (sequential, max_memory)", a.patterns(layer), b.patterns(layer)) <= ATOL


def test_meta_initialised_model_dispatched_by_accelerate(tiny_folder, tmp_path):
    """A model built on the meta device (no memory) and filled from the checkpoint by accelerate, part of it offloaded
    to disk, wraps as it is (`hl.load(model)` keeps accelerate's placement) and equals the single-device run."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    folder = tiny_folder("llama")
    cls, config = tiny_config("llama")
    with init_empty_weights():
        empty = cls(config)
    assert all(p.device.type == "meta" for p in empty.parameters())
    placed = load_checkpoint_and_dispatch(empty, str(folder), device_map=LLAMA_MAP, offload_folder=str(tmp_path))
    spread = hl.load(placed)
    assert spread.device_map == LLAMA_MAP
    single = hl.load(folder, device="cpu")
    a, b = single.run(IDS), spread.run(IDS)
    assert _err("llama: logits (meta-initialised, dispatched)", a.logits, b.logits) <= ATOL
    for layer in range(single.n_layers):
        assert _err("llama: patterns (meta-initialised, dispatched)", a.patterns(layer), b.patterns(layer)) <= ATOL
    with pytest.raises(HeadlabError, match="already placed by a device map"):
        hl.load(placed, device="cpu")


def test_model_object_dispatched_by_load(tiny_folder, tmp_path):
    """`hl.load(hf_model, device_map=...)` places an in-memory model with accelerate (its disk entries are written
    to the offload folder)."""
    folder = tiny_folder("llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, use_kernels=False)
    single = hl.load(folder, device="cpu")
    spread = hl.load(hf, device_map=LLAMA_MAP, offload_folder=tmp_path)
    assert any(tmp_path.iterdir()), "nothing was offloaded to the folder"
    with hl.edit(single, [hl.Ablate(hl.HeadRef(0, 3))]):
        a = single.run(IDS)
    with hl.edit(spread, [hl.Ablate(hl.HeadRef(0, 3))]):
        b = spread.run(IDS)
    assert _err("llama: edited logits (object dispatched)", a.logits, b.logits) <= ATOL
    size = sum(p.numel() * p.element_size() for p in single.hf.parameters())
    again = transformers.LlamaForCausalLM.from_pretrained(folder, use_kernels=False)
    with pytest.raises(HeadlabError, match="puts part of the model on disk.*give offload_folder"):
        hl.load(again, device_map="sequential", max_memory={"cpu": int(0.7 * size)})


@pytest.mark.parametrize("device_map,offload,match", [
    ({**LLAMA_MAP, "lm_head": "cuda:3"}, True, r"device_map\['lm_head'\].*'cuda:3' does not exist"),
    ({**LLAMA_MAP, "lm_head": "gpu"}, True, r"'gpu' is not a device"),
    ({**LLAMA_MAP, "model.layers.7": "cpu"}, True, r"module\(s\) 'model.layers.7'.*does not have"),
    ({k: v for k, v in LLAMA_MAP.items() if k != "model.layers.1"}, True, r"no device for model\.layers\.1\."),
    (LLAMA_MAP, False, r"model\.layers\.0.*on disk: give offload_folder"),
    ("everywhere", True, r"device_map must be one of auto"),
], ids=["absent-cuda", "not-a-device", "unknown-module", "uncovered-layer", "disk-without-folder", "bad-string"])
def test_bad_maps_are_refused_by_name(tiny_folder, tmp_path, device_map, offload, match):
    with pytest.raises(HeadlabError, match=match):
        hl.load(tiny_folder("llama"), device_map=device_map, offload_folder=tmp_path if offload else None)
    assert not any(tmp_path.iterdir())


def test_bad_placement_arguments(tiny_folder, tmp_path):
    folder = tiny_folder("llama")
    with pytest.raises(HeadlabError, match="not both"):
        hl.load(folder, device="cpu", device_map=LLAMA_MAP, offload_folder=tmp_path)
    with pytest.raises(HeadlabError, match="only apply with a device_map"):
        hl.load(folder, offload_folder=tmp_path)
    with pytest.raises(HeadlabError, match="only applies to the automatic maps"):
        hl.load(folder, device_map=LLAMA_MAP, max_memory={"cpu": "1GiB"}, offload_folder=tmp_path)
    with pytest.raises(HeadlabError, match=r"max_memory\['cuda:5'\]"):
        hl.load(folder, device_map="auto", max_memory={"cuda:5": "1GiB"})
    with pytest.raises(HeadlabError, match="not a size"):
        hl.load(folder, device_map="auto", max_memory={"cpu": 1.5})
    assert check_device(0, "x") == 0 if torch.cuda.is_available() else True
    with pytest.raises(HeadlabError, match="not a device"):
        check_device(True, "device_map['x']")


@pytest.mark.slow
def test_smollm2_device_map_equals_single_device(tmp_path):
    """The bundled SmolLM2-135M with its middle layers on disk and the rest in CPU memory."""
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": "disk" if 10 <= i < 20 else "cpu" for i in range(30)}}
    single = hl.load("smollm2-135m", device="cpu")
    spread = hl.load("smollm2-135m", device_map=dm, offload_folder=tmp_path)
    assert spread.note == single.note and spread.device_map == dm
    assert spread.hf.model.layers[15].self_attn.q_proj.weight.device.type == "meta"
    prompt = "The cat sat on the mat. The cat sat on the"
    heads = [hl.HeadRef(3, 2), hl.HeadRef(15, 4), hl.HeadRef(25, 0)]
    a, b = single.run(prompt, heads=heads), spread.run(prompt, heads=heads)
    assert _err("smollm2: logits", a.logits, b.logits) <= 1e-4
    for head in heads:
        assert _err("smollm2: patterns", a.pattern(head), b.pattern(head)) <= 1e-5
    sa, sb = single.stats(prompt, statistics="lse"), spread.stats(prompt, statistics="lse")
    for layer in range(30):
        assert _err("smollm2: stats lse", sa.layers[layer].lse, sb.layers[layer].lse) <= 1e-4
    edits = [hl.Ablate(hl.HeadRef(15, 4)), hl.Scale(hl.HeadRef(12, 1), factor=0.0)]
    with hl.edit(single, edits):
        ea = single.forward(prompt).logits
    with hl.edit(spread, edits):
        eb = spread.forward(prompt).logits
    assert float((ea - a.logits).abs().max()) > 1e-3
    assert _err("smollm2: edited logits", ea, eb) <= 1e-4
