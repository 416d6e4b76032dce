"""Checkpoints: exact round trips, atomic writes, refused when the bytes are not the recorded ones."""

import subprocess
import sys

import pytest
from processor.store import read_checkpoint, write_checkpoint
import torch

from stages import checkpoint
from stages.checkpoint import CheckpointError
from stages.definitions import STAGE_NAMES, JobInputs, fingerprint_chain
from config import StageParameters


def conditioning():
    return [[torch.randn(1, 7, 16), {"pooled_output": None,
                                     "reference_latents": [torch.randn(1, 16, 1, 8, 8)],
                                     "attention_mask": torch.ones(1, 7, dtype=torch.int64)}]]


def test_nested_payloads_round_trip_exactly(tmp_path):
    payload = {"conditioning": conditioning(), "sizes": (64, 48), "name": "x", "flag": True,
               "bf16": torch.randn(3, 3).to(torch.bfloat16), "nothing": None}
    sha = write_checkpoint(tmp_path / "c.safetensors", payload)[0]
    back = read_checkpoint(tmp_path / "c.safetensors", sha)
    assert back["sizes"] == (64, 48) and back["name"] == "x" and back["flag"] is True and back["nothing"] is None
    assert back["conditioning"][0][1]["pooled_output"] is None
    assert torch.equal(back["conditioning"][0][0], payload["conditioning"][0][0])
    assert torch.equal(back["conditioning"][0][1]["reference_latents"][0], payload["conditioning"][0][1]["reference_latents"][0])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], payload["bf16"])


def test_a_checkpoint_is_read_the_same_in_another_process(tmp_path):
    tensor = torch.randn(4, 4)
    sha = write_checkpoint(tmp_path / "c.safetensors", {"t": tensor})[0]
    code = (f"import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent.parent)!r});"
            f"from processor.store import read_checkpoint; import torch;"
            f"p = read_checkpoint(__import__('pathlib').Path({str(tmp_path / 'c.safetensors')!r}), {sha!r});"
            f"print(p['t'].sum().item().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == tensor.sum().item().hex()


def test_a_corrupted_or_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    sha = write_checkpoint(path, {"t": torch.randn(16)})[0]
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(path, sha)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(path, sha)


def test_writes_leave_no_temporary_files(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"t": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_payload_of_numpy_arrays_comes_back_as_numpy_without_torch(tmp_path):
    import numpy as np
    payload = {"images": [np.arange(12, dtype=np.uint8).reshape(2, 2, 3)], "x": np.float32(0.5) * np.ones(3, np.float32)}
    sha = write_checkpoint(tmp_path / "n.safetensors", payload)[0]
    code = (f"import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent.parent)!r});"
            f"from processor.store import read_checkpoint; import pathlib;"
            f"p = read_checkpoint(pathlib.Path({str(tmp_path / 'n.safetensors')!r}), {sha!r});"
            f"print(type(p['images'][0]).__module__, p['images'][0].tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"numpy {payload['images'][0].tolist()} False"


def test_objects_that_are_not_tensors_or_json_are_refused():
    with pytest.raises(TypeError, match="cannot checkpoint"):
        checkpoint.encode({"x": object()})


def test_a_seed_change_changes_only_the_sample_and_decode_fingerprints():
    job = JobInputs("p", "", 1, (("image1", "abc"),))
    identities = {"vae": "v", "text_encoder": "t", "transformer": "d"}
    one = fingerprint_chain(job, StageParameters(), "diffusers 1", identities)
    two = fingerprint_chain(JobInputs("p", "", 2, (("image1", "abc"),)), StageParameters(), "diffusers 1", identities)
    assert [s for s in STAGE_NAMES if one[s] != two[s]] == ["sample", "decode"]
    other_engine = fingerprint_chain(job, StageParameters(), "comfyui 1", identities)
    assert all(one[s] != other_engine[s] for s in STAGE_NAMES)
    new_vae = fingerprint_chain(job, StageParameters(), "diffusers 1", {**identities, "vae": "v2"})
    assert [s for s in STAGE_NAMES if one[s] != new_vae[s]] == ["encode_text", "encode_latent", "sample", "decode"]
