"""GPU behaviour. Tests marked `gpu` need CUDA and skip with that reason elsewhere; scripts/gpu_check.sh runs
them on a CUDA machine. The out-of-memory test runs everywhere: CUDA's error is raised by a stand-in."""

import pytest
import torch

from chunktui.shared.errors import DeviceMemoryError
from chunktui.engine.matching import pack
from chunktui.engine.models import load_model
from chunktui.engine.perturb import Intervention, Positions, intervene, select_chunks
from chunktui.engine.streaming import PhaseFlag, generate_stream, scan_text
from chunktui.shared.settings import Sampling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs to shard across")


def test_out_of_memory_mid_generation_leaves_the_model_usable(tiny_model, tiny_dict, monkeypatch):
    """A CUDA OOM in the middle of a stream is a DeviceMemoryError; hooks are gone and the next run is normal."""
    dictionary, _ = tiny_dict
    intervention = Intervention(select_chunks(dictionary, ["cheese"], [1, 2]), "graft", 0.5, Positions("all"))
    sampling = Sampling(max_new_tokens=8, stop_at_eos=False)
    block = tiny_model.layout.blocks[2]
    calls = {"n": 0}
    original = block.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    before = [e.token_id for e in generate_stream(tiny_model, "The dog", sampling)]
    monkeypatch.setattr(block, "forward", flaky)
    with pytest.raises(DeviceMemoryError, match="Out of memory on cpu while generating. Nothing was lost"):
        with intervene(tiny_model, intervention, PhaseFlag()):
            list(generate_stream(tiny_model, "The dog", sampling))
    monkeypatch.setattr(block, "forward", original)
    assert all(not b._forward_pre_hooks for b in tiny_model.layout.blocks)  # no edit left behind
    assert [e.token_id for e in generate_stream(tiny_model, "The dog", sampling)] == before


@pytest.mark.gpu
@needs_cuda
def test_loads_straight_onto_the_gpu_in_bf16(tiny_model, tmp_path):
    tiny_model.model.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cuda")
    assert loaded.dtype == torch.bfloat16
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    result = scan_text(loaded, "The dog ate the cheese.")
    events = list(generate_stream(loaded, "The dog", Sampling(max_new_tokens=4)))
    assert events[-1].hidden.dtype == torch.bfloat16  # states recorded in the model's dtype
    assert result.hidden.shape[1] == loaded.layout.n_states


@pytest.mark.gpu
@needs_cuda
def test_cuda_matching_is_float32_and_decides_as_float64(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    H = torch.randn(4000, tiny_model.layout.n_states, tiny_model.hidden_size, dtype=torch.bfloat16)
    fast = pack(dictionary.chunks, tiny_model.hidden_size, tiny_model.layout.n_states, "cuda")
    assert fast.precision == "float32"
    exact = pack(dictionary.chunks, tiny_model.hidden_size, tiny_model.layout.n_states, "cpu", precision="float64")
    assert torch.equal(fast.match(H.cuda()).hit.cpu(), exact.match(H).hit)


@pytest.mark.gpu
@needs_cuda
@needs_two
def test_sharded_across_two_gpus_equals_one(tiny_model, tiny_dict, tmp_path):
    tiny_model.model.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    one = load_model(str(tmp_path), device="cuda:0", dtype="float32")
    two = load_model(str(tmp_path), device_map="balanced", dtype="float32")
    assert len({str(d) for d in two.device_map.values()}) >= 2
    sampling = Sampling(max_new_tokens=12, stop_at_eos=False)
    a = list(generate_stream(one, "The dog ate", sampling))
    b = list(generate_stream(two, "The dog ate", sampling))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert torch.allclose(a[-1].hidden.cpu(), b[-1].hidden.cpu(), atol=1e-4)
    dictionary, _ = tiny_dict
    intervention = Intervention(select_chunks(dictionary, ["cheese"], [1, 3]), "graft", 1.0, Positions("all"))
    with intervene(one, intervention, PhaseFlag()):
        ga = [e.token_id for e in generate_stream(one, "The dog ate", sampling)]
    with intervene(two, intervention, PhaseFlag()):
        gb = [e.token_id for e in generate_stream(two, "The dog ate", sampling)]
    assert ga == gb
