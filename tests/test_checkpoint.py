"""TTT weights files: rebuild a TTT model from a base Moshi checkpoint plus the TTT file."""

import copy

import pytest
import torch
from conftest import random_codes, randomize_ttt
from moshi.models import LMModel
from safetensors.torch import save_file

from moshi_ttt import (
    TTTConfig,
    apply_ttt,
    load_ttt_config,
    load_ttt_weights,
    save_ttt_weights,
    to_moshi_state_dict,
    ttt_state_dict,
)
from moshi_ttt.tiny import build_tiny_lm, tiny_lm_kwargs

CFG = TTTConfig(chunk_size=8, eta=0.05, layers=[1, 3], target_source="input_emb")


def _text_logits(model, codes):
    model.train()
    out = model(codes)
    return out.text_logits[out.text_mask]


@pytest.mark.numerics
def test_rebuild_from_base_plus_ttt_file(tmp_path):
    base = build_tiny_lm(seed=3)
    trained = apply_ttt(copy.deepcopy(base), CFG)
    randomize_ttt(trained)
    path = save_ttt_weights(trained, tmp_path / "ttt.safetensors")
    assert sorted(ttt_state_dict(trained)) == sorted(
        f"transformer.layers.{i}.gating.{n}" for i in (1, 3) for n in ("w_down", "target_conv", "target_proj")
    )
    cfg = load_ttt_config(path)
    assert cfg == CFG
    rebuilt = apply_ttt(copy.deepcopy(base), cfg)
    load_ttt_weights(rebuilt, path)
    codes = random_codes(base, 2, 30)
    assert torch.equal(_text_logits(rebuilt, codes), _text_logits(trained, codes))
    # The pretrained copy comes from the base model, not from the trained w_down.
    for i in (1, 3):
        g = rebuilt.transformer.layers[i].gating
        assert torch.equal(g.w_down_pretrained, base.transformer.layers[i].gating.linear_out.weight.float())


def test_mismatched_layers_or_settings_are_refused(tmp_path):
    base = build_tiny_lm()
    trained = apply_ttt(copy.deepcopy(base), CFG)
    path = save_ttt_weights(trained, tmp_path / "ttt.safetensors")
    other = apply_ttt(
        copy.deepcopy(base), TTTConfig(chunk_size=8, eta=0.05, layers=[0, 3], target_source="input_emb")
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="different TTT settings"):
        load_ttt_weights(other, path)
    with pytest.raises(ValueError, match="does not match this model's TTT layers"):
        load_ttt_weights(other, path, check_config=False)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing half-loaded


def test_bad_files_give_clear_errors(tmp_path):
    model = apply_ttt(build_tiny_lm(), CFG)
    with pytest.raises(ValueError, match="not found"):
        load_ttt_weights(model, tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_ttt_config(garbage)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a moshi_ttt TTT weights file"):
        load_ttt_weights(model, plain)
    with pytest.raises(ValueError, match="no TTT layers"):
        save_ttt_weights(build_tiny_lm(), tmp_path / "x.safetensors")


def test_moshi_layout_export_loads_strictly_into_vanilla_moshi():
    base = build_tiny_lm()
    model = apply_ttt(copy.deepcopy(base), CFG)
    randomize_ttt(model)
    sd = to_moshi_state_dict(model)
    vanilla = LMModel(device="cpu", **tiny_lm_kwargs())
    vanilla.load_state_dict(sd, strict=True)
    # With eta = 0 (no updates) the TTT model is exactly the exported vanilla model.
    model.transformer.layers[1].gating.config.eta = 0.0
    codes = random_codes(base, 1, 25)
    torch.testing.assert_close(_text_logits(vanilla, codes), _text_logits(model, codes), atol=1e-5, rtol=1e-5)
