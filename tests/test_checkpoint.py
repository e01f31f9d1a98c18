"""One copy of the weights: loaded weights leave the checkpoint's mapping, and the sparsity
space restores dense values from the checkpoint on disk, giving the same model as a copy."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import spaces
import spaces.sparsity as sparsity
from searcher.checkpoint import CheckpointTensors, _mapped_files, own_weights
from searcher.models import load
from tests.helpers import logits, save_tiny, tiny_tokenizer
from tests.test_families import build

SEQ = 16


def _in_a_mapping(model: torch.nn.Module) -> list[str]:
    ranges = _mapped_files()
    return [
        name
        for name, p in model.named_parameters()
        if any(a <= p.untyped_storage().data_ptr() < b for a, b in ranges)
    ]


def test_loaded_weights_are_copied_out_of_the_mapped_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m")
    mapped = AutoModelForCausalLM.from_pretrained(path)  # transformers maps the file
    assert _in_a_mapping(mapped)  # (else this test proves nothing)
    ids = torch.randint(0, mapped.config.vocab_size, (2, SEQ), generator=torch.Generator())
    model = load(str(path)).model
    assert not _in_a_mapping(model)
    torch.testing.assert_close(logits(model, ids), logits(mapped, ids), atol=0, rtol=0)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == mapped.config.tie_word_embeddings
    assert own_weights(model) == 0  # nothing left to copy


def _built(model: torch.nn.Module, use_checkpoint: bool) -> spaces.SearchSpace:
    windows = torch.randint(0, model.config.vocab_size, (4, SEQ), generator=torch.Generator())
    if use_checkpoint:
        return spaces.build("sparsity", spaces.Structure.of(model), SEQ, windows)
    original = sparsity._stored_name
    sparsity._stored_name = lambda *_: None
    try:
        return spaces.build("sparsity", spaces.Structure.of(model), SEQ, windows)
    finally:
        sparsity._stored_name = original


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D, unprefixed names
def test_sparsity_restores_dense_values_from_the_checkpoint(model_type, tmp_path: Path) -> None:
    build(model_type).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model = load(str(tmp_path / "m")).model
    twin = copy.deepcopy(model)
    disk, resident = _built(model, True), _built(twin, False)
    assert disk._copies == {} and len(resident._copies) == len(resident.genes)
    assert disk.fingerprint() == resident.fingerprint()
    rng = np.random.default_rng(0)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator())
    for _ in range(3):
        c = tuple(int(rng.integers(0, n)) for n in disk.n_levels)
        disk.apply(c)
        resident.apply(c)
        torch.testing.assert_close(logits(model, ids), logits(twin, ids), atol=0, rtol=0)
    disk.apply(disk.dense())
    resident.apply(resident.dense())
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


def test_weights_that_differ_from_the_checkpoint_are_kept_as_copies(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m")
    model = load(str(path)).model
    changed = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(changed).weight.mul_(2)
    space = _built(model, True)
    names = [g.name for g in space.genes]
    assert set(space._copies) == {names.index(changed)}
    assert CheckpointTensors.of(model) is not None


def test_a_model_built_in_memory_has_no_checkpoint() -> None:
    assert CheckpointTensors.of(build("llama")) is None
