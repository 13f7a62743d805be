"""Listing dictionaries before the first token: the one to be used is read in full, the others from their
headers alone, and a dictionary whose header is fine but whose tensors are not is refused when it is picked."""

from __future__ import annotations

import pytest

from chunktui.api import Engine
from chunktui.engine.dictionary import DictionaryHeader, load_dictionary, peek_dictionary
from chunktui.server import Server
from chunktui.shared import protocol as p


class _Conn:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, event) -> None:
        self.sent.append(event)


@pytest.fixture()
def server(tiny_model):
    srv = Server(_Conn())
    srv.engine = Engine.from_loaded(tiny_model)
    return srv


def _broken_tensors(path, out):
    """A copy whose header is intact and whose first chunk's tensor holds a NaN (caught only when loaded)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith("template"))[0]
    tensors[key][0] = float("nan")
    save_file(tensors, str(out), metadata=meta)
    return out


def test_peek_reads_the_header_alone(tiny_dict):
    dictionary, path = tiny_dict
    model, labels, n = peek_dictionary(path)
    assert n == len(dictionary.chunks) and labels == dictionary.labels()
    assert model["fingerprint_digest"] == dictionary.model["fingerprint_digest"]


def test_the_chosen_is_loaded_in_full_and_the_rest_from_headers(server, tiny_dict, tmp_path, monkeypatch):
    dictionary, path = tiny_dict
    broken = _broken_tensors(path, tmp_path / "broken.chunks.safetensors")
    with pytest.raises(Exception):
        load_dictionary(broken)
    full_reads = []
    real = load_dictionary

    def counting(p_, *a, **k):
        full_reads.append(str(p_))
        return real(p_, *a, **k)

    monkeypatch.setattr("chunktui.engine.dictionary.load_dictionary", counting)
    server._list([str(path), str(broken)], str(path), auto=True)
    listed = next(e for e in server.conn.sent if isinstance(e, p.DictionariesListed))
    assert [e.problem for e in listed.entries] == [None, None]  # the broken one's header is fine
    assert [e.chunks for e in listed.entries] == [len(dictionary.chunks)] * 2
    assert str(broken) not in full_reads  # never loaded: not chosen
    assert listed.select == str(path) and server.engine.dictionary is not None


def test_a_chosen_header_whose_tensors_are_broken_is_refused_with_a_message(server, tiny_dict, tmp_path):
    _, path = tiny_dict
    broken = _broken_tensors(path, tmp_path / "broken.chunks.safetensors")
    found, problem = server.engine.check_dictionary(broken, header_only=True)
    assert isinstance(found, DictionaryHeader) and problem is None
    missing = tmp_path / "missing.chunks.safetensors"
    # the asked-for file is gone, so the first other usable one is taken: known from its header only, it is read
    # in full now, its bad tensor found and reported, and none is used
    server._list([str(missing), str(broken)], str(missing), auto=True)
    failed = [e for e in server.conn.sent if isinstance(e, p.Failed)]
    listed = next(e for e in server.conn.sent if isinstance(e, p.DictionariesListed))
    assert listed.entries[0].problem == "file not found"
    assert listed.entries[1].problem and "finite" in listed.entries[1].problem
    assert server.engine.dictionary is None and listed.select is None
    assert [f.title for f in failed] == ["Dictionary not usable", "Dictionary not usable"]
    assert "broken.chunks.safetensors" in failed[1].text
