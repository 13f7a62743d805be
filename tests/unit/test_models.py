"""Model specs, layouts, and where the residual stream is read."""

import pytest
import torch

from chunktui.shared.errors import ModelLoadError, UnsupportedArchitectureError
from chunktui.engine.hooks import ResidualRecorder
from chunktui.shared.validate import parse_layers
from chunktui.engine.layout import find_layout
from chunktui.engine.models import load_model, resolve_device, resolve_dtype
from chunktui.shared.specs import resolve_spec


@pytest.mark.parametrize("spec, blocks", [("random:llama-tiny", 4), ("random:gpt2-tiny", 3),
                                          ("random:neox-tiny", 3), ("random:qwen2-tiny", 3)])
def test_layout_of_each_family(spec, blocks):
    loaded = load_model(spec)
    assert loaded.n_layers == blocks
    assert loaded.hidden_size == 64
    assert loaded.layout.n_states == blocks + 1


@pytest.mark.parametrize("spec", ["random:llama-tiny", "random:gpt2-tiny", "random:neox-tiny"])
def test_recorder_matches_hugging_face_hidden_states(spec):
    """H[l] for l < L is the stream entering block l; H[L] is the final-norm output, as in docs/method.md."""
    loaded = load_model(spec)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with ResidualRecorder(loaded.layout) as rec:
        out = loaded.model(input_ids=ids, output_hidden_states=True)
    mine = rec.states()[0]  # (T, L+1, d)
    theirs = torch.stack(out.hidden_states, dim=2)[0]
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_unknown_specs_have_specific_messages(tmp_path):
    with pytest.raises(ModelLoadError, match="Unknown model 'no-such-model'.*chunktui models"):
        resolve_spec("no-such-model")
    with pytest.raises(ModelLoadError, match="Unknown random model 'huge'"):
        resolve_spec("random:huge")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_spec(str(tmp_path))
    assert resolve_spec("someone/some-model").kind == "hub"
    assert resolve_spec(None).name == "smollm2-135m"


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("nobody/not-a-model")


def test_devices_and_dtypes():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="Unknown device"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_unsupported_architecture_is_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "oddnet", "hidden_size": 8})()
            self.stuff = torch.nn.Linear(8, 8)

    with pytest.raises(UnsupportedArchitectureError, match="'oddnet'"):
        find_layout(Odd())


def test_parse_layers():
    assert parse_layers("all", 5) == [0, 1, 2, 3, 4]
    assert parse_layers("1-3", 5) == [1, 2, 3]
    assert parse_layers("0,2,-1", 5) == [0, 2, 4]
    with pytest.raises(Exception, match="out of range"):
        parse_layers("9", 5)
    with pytest.raises(Exception, match="Bad layer spec"):
        parse_layers("a-b", 5)
