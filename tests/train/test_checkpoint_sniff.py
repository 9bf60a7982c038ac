"""The pickle sniffing of checkpoint loading must not refuse a safetensors file whose header
length happens to start with the bytes of a pickle or zip signature (found by a shared-weight
model's checkpoint with an 18,304-byte header, 0x4780: first byte 0x80)."""

import json
import pickle
import struct

import pytest
import torch

from pnnh.errors import CheckpointError
from pnnh.train.checkpoint import FORMAT, load_weights, read_metadata


def write_safetensors(path, header_len: int) -> None:
    """A valid safetensors file (one float32 zero) whose JSON header is space-padded to ``header_len``."""
    header = {"model.x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "__metadata__": {"format": FORMAT, "kind": "weights", "model": '"m"', "model_kwargs": "{}"}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len) + raw.ljust(header_len, b" ") + b"\0\0\0\0")


@pytest.mark.parametrize("header_len", [0x4780, 0x4B50])  # first bytes 0x80 (pickle) and "PK" (zip)
def test_safetensors_header_length_that_looks_like_a_pickle_is_accepted(tmp_path, header_len):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, header_len)
    assert open(path, "rb").read(1) in (b"\x80", b"P")
    assert read_metadata(path)["kind"] == "weights"
    m = torch.nn.Module()
    m.x = torch.nn.Parameter(torch.ones(1))
    load_weights(path, m)
    assert m.x.item() == 0.0


def test_real_pickle_still_refused(tmp_path):
    p = tmp_path / "p.pt"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        read_metadata(p)
    z = tmp_path / "z.pt"
    torch.save({"a": torch.zeros(2)}, z)
    with pytest.raises(CheckpointError, match="pickle"):
        read_metadata(z)
