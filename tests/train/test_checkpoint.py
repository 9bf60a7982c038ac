"""Checkpoints: atomic safetensors files, refused when unsafe or mismatched."""

import os
import pickle

import pytest
import torch

import pnnh
from pnnh.errors import CheckpointError
from pnnh.train.checkpoint import load_checkpoint, load_weights, read_metadata, save_checkpoint, save_weights


def _model(name="resnet20"):
    return pnnh.create_model(name, width=0.5)


def test_roundtrip_model_optimizer_rng(tmp_path):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, m, opt, {"step": 7, "curve": [[1, 2.0]]})
    expected_next = torch.rand(3)

    m2 = _model()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    state = load_checkpoint(path, m2, opt2)
    assert state == {"step": 7, "curve": [[1, 2.0]]}
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert torch.equal(s1[i]["momentum_buffer"], s2[i]["momentum_buffer"])
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    assert read_metadata(path)["model"] == "resnet20"


def test_adamw_state_roundtrip(tmp_path):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", m, opt, {})
    opt2 = torch.optim.AdamW(_model().parameters(), lr=1e-3)
    load_checkpoint(tmp_path / "c.safetensors", _model(), opt2)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"]) and float(s1["step"]) == float(s2["step"])


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.safetensors"
    torch.save({"model": Evil()}, bad)  # a zip+pickle as torch.save writes it
    with pytest.raises(CheckpointError, match="pickle"):
        load_weights(bad, _model())
    raw = tmp_path / "evil2.safetensors"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(raw, _model())
    assert not marker.exists()


def test_other_architecture_refused_naming_the_mismatch(tmp_path):
    save_weights(tmp_path / "w.safetensors", _model("resnet20"))
    with pytest.raises(CheckpointError, match="resnet20.*architectures differ"):
        load_weights(tmp_path / "w.safetensors", _model("resnet32"))


def test_truncated_and_missing_files(tmp_path):
    p = tmp_path / "c.safetensors"
    save_checkpoint(p, _model(), None, {})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(p, _model())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors", _model())


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    p = tmp_path / "c.safetensors"
    m = _model()
    save_checkpoint(p, m, None, {"step": 1})
    before = p.read_bytes()

    import pnnh.train.checkpoint as ck

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(p, m, None, {"step": 2})
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_same_shapes_other_architecture_refused(tmp_path):
    # resnet20 and plain20 have identical state dicts (option-A shortcuts hold no weights)
    assert {k: v.shape for k, v in _model("resnet20").state_dict().items()} == \
        {k: v.shape for k, v in _model("plain20").state_dict().items()}
    save_checkpoint(tmp_path / "c.safetensors", _model("resnet20"), None, {})
    with pytest.raises(CheckpointError, match="saved from model 'resnet20', not 'plain20'.*architectures differ"):
        load_checkpoint(tmp_path / "c.safetensors", _model("plain20"))
    with pytest.raises(CheckpointError, match="saved from model 'resnet20', not 'plain20'"):
        load_weights(tmp_path / "c.safetensors", _model("plain20"))


def test_width_mismatch_names_the_tensor_and_shapes(tmp_path):
    save_weights(tmp_path / "w.safetensors", _model("resnet20"))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*stem.0.weight: checkpoint \(8, 1, 3, 3\) vs model \(16, 1, 3, 3\)"):
        load_weights(tmp_path / "w.safetensors", pnnh.create_model("resnet20"))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickles_of_any_protocol_are_refused_unexecuted(tmp_path, protocol):
    """Protocols >= 2 start with the PROTO opcode (0x80) and are named as pickles; protocol 0/1 text
    pickles fail the safetensors header check. Either way nothing is unpickled."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / f"evil{protocol}.safetensors"
    p.write_bytes(pickle.dumps(Evil(), protocol=protocol))
    with pytest.raises(CheckpointError, match="pickle" if protocol >= 2 else "not a safetensors file|corrupt"):
        load_checkpoint(p, _model())
    with pytest.raises(CheckpointError):
        read_metadata(p)
    legacy = tmp_path / "legacy.pt"  # torch.save's pre-1.6 (non-zip) format
    torch.save({"x": Evil()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        load_weights(legacy, _model())
    assert not marker.exists()


def test_safetensors_file_that_is_not_a_pnnh_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a pnnh checkpoint"):
        load_weights(tmp_path / "other.safetensors", _model())
    save_weights(tmp_path / "w.safetensors", _model())
    with pytest.raises(CheckpointError, match="weights only, not a resumable training checkpoint"):
        load_checkpoint(tmp_path / "w.safetensors", _model())


def test_reading_while_the_writer_replaces_the_file_sees_one_whole_version(tmp_path):
    """A resume or monitor reading while training replaces the checkpoint never mixes two versions.

    The writer alternates checkpoints whose headers differ in length (step 9 vs step 10**12), so a
    reader that took its header from one file and its bytes from the other (two opens by name) would
    fail on the size check or decode the wrong tensors: this is the race CI once hit.
    """
    import threading

    path = tmp_path / "checkpoint.safetensors"
    m = pnnh.create_model("resnet20", width=0.25)
    save_checkpoint(path, m, None, {"step": 0})
    stop, errors = threading.Event(), []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            with torch.no_grad():
                m.fc.bias.fill_(float(i))
            save_checkpoint(path, m, None, {"step": i, "pad": "x" * (i % 7) * 10})

    t = threading.Thread(target=writer)
    t.start()
    try:
        reader = pnnh.create_model("resnet20", width=0.25)
        for _ in range(300):
            step = read_metadata(path)["state"]["step"]
            state = load_checkpoint(path, reader, restore_rng=False)
            assert state["step"] >= step  # never older than a header read before it
            # the weights belong to the same version as the metadata read with them
            assert reader.fc.bias.detach()[0].item() == float(state["step"])
    except Exception as e:  # keep the writer from outliving the test
        errors.append(e)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[0]


def test_a_pnnh_checkpoint_from_before_the_dirac_default_says_how_to_load_it(tmp_path):
    old = pnnh.create_model("pnnh20", path_param="init")
    save_weights(tmp_path / "w.safetensors", old)
    with pytest.raises(CheckpointError, match="path_param='init'"):
        load_weights(tmp_path / "w.safetensors", pnnh.create_model("pnnh20"))
    load_weights(tmp_path / "w.safetensors", pnnh.create_model("pnnh20", path_param="init"))
