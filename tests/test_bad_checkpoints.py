"""A model directory that is wrong in any of the ways users hand one over: each is a one-line error
naming the file and the field or tensor, before anything is built or judged."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokenization
from checkpoint import load_config, load_pretrained, save_pretrained
from model import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    save_pretrained(Transformer(CONFIG), tmp_path / "m")
    return tmp_path / "m"


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))


def edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("fields,match", [
    ({"hidden_size": "16"}, r"hidden_size must be a positive integer, got '16'"),
    ({"num_key_value_heads": 0}, r"num_key_value_heads must be a positive integer"),
    ({"num_attention_heads": 3, "head_dim": None}, r"hidden_size=16 does not divide into num_attention_heads=3"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 4}, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"tie_word_embeddings": "no"}, r"tie_word_embeddings must be true or false"),
])
def test_config_fields_are_checked_by_type_and_relation(saved, fields, match):
    edit_config(saved, **fields)
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        load_pretrained(saved)


def test_config_that_is_not_json_names_the_file_and_line(saved):
    (saved / "config.json").write_text('{"hidden_size": 16,\n "vocab_size": }')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(Expecting value, line 2"):
        load_config(saved)


def test_an_embedding_with_more_rows_than_vocab_size_is_refused(saved):
    edit_weights(saved, lambda t: t.update({"model.embed_tokens.weight": torch.zeros(72, 16)}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' has shape "
                                         r"\[72, 16\], but config.json makes it \[64, 16\]"):
        load_pretrained(saved)


def test_a_layer_of_the_wrong_width_is_refused_before_loading(saved):
    edit_weights(saved, lambda t: t.update({"model.layers.1.mlp.gate_proj.weight": torch.zeros(16, 16)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.gate_proj.weight' has shape \[16, 16\], .* \[32, 16\]"):
        load_pretrained(saved)


def test_a_truncated_safetensors_file_is_named(saved):
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:int(file.stat().st_size * 0.6)])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file .* cut short"):
        load_pretrained(saved)


def test_a_pickled_bin_checkpoint_says_how_to_convert(saved):
    os.remove(saved / "model.safetensors")
    (saved / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin: only safetensors are read .* safe_serialization=True"):
        load_pretrained(saved)


def test_nan_weights_are_refused_at_load(saved):
    edit_weights(saved, lambda t: t["model.layers.0.self_attn.q_proj.weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' holds NaN or inf"):
        load_pretrained(saved)


def test_an_export_killed_between_its_renames_is_repaired_by_the_reader(saved):
    os.replace(saved, str(saved) + ".old")  # what a kill between publish's two renames leaves
    model = load_pretrained(saved)
    assert model.config.hidden_size == 16 and saved.is_dir() and not os.path.exists(str(saved) + ".old")


def test_a_model_directory_without_tokenizer_files_says_which_are_missing(saved):
    with pytest.raises(ValueError, match=r"no tokenizer files \(looked for tokenizer.json, .*copy those files"):
        tokenization.load_tokenizer(saved)
