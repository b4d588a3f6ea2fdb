import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import fastflow

from ..conftest import tiny_diffusers_flux


def write_raw(path, header: dict, data: bytes = b"", header_bytes: bytes | None = None):
    """Write a safetensors-like file byte by byte (for malformed files)."""
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.fixture(scope="session")
def sharded_dev(tmp_path_factory):
    """A sharded diffusers folder of the tiny dev model (several shards + index.json)."""
    folder = tmp_path_factory.mktemp("sharded_dev")
    tiny_diffusers_flux("flux-tiny-dev", seed=5).save_pretrained(folder, max_shard_size="400KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="session")
def bfl_state(sharded_dev):
    """Official-layout state dict of the same weights (through our diffusers map)."""
    model = fastflow.load_transformer(sharded_dev, variant="flux-tiny-dev", dtype=torch.float32)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture
def bfl_file(tmp_path, bfl_state):
    path = tmp_path / "flux-tiny-dev.safetensors"
    save_file(bfl_state, str(path), metadata={"fastflow.variant": "flux-tiny-dev"})
    return path
