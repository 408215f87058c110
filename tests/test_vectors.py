"""Contrastive vectors, projection onto SAE features, and the native, ds4 and GGUF exports."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from steering.steerer import encode_prompt
from steering.contrast import contrast_vector
from steering.exports import export_ds4, export_gguf
from steering.vectors import SteeringVector, VectorError, nearest_features
from activations.sites import Site
from pipeline.steer import contrast, export, project
from conftest import SMOL_SITE, compose_config, live_feature, random_vector

PROMPTS = ["Why is the sky blue?", "How do magnets work?", "What is rain?"]


def test_contrast_vector_is_the_mean_difference_at_the_last_prompt_token(smol):
    ids = lambda prompts: [encode_prompt(smol.tokenizer, p, True) for p in prompts]  # noqa: E731
    positives, negatives = ids([p + " Respond tersely." for p in PROMPTS]), ids(PROMPTS)
    vector = contrast_vector("t", smol.adapter, positives, negatives, "resid_post", [2, 5])
    for layer in (2, 5):
        site = Site(layer, "resid_post")
        last = lambda group: torch.stack([smol.adapter.capture([site], x[None])[site][0, -1] for x in group])  # noqa: E731
        torch.testing.assert_close(vector.directions[layer], last(positives).mean(0) - last(negatives).mean(0))
    assert vector.operation == "add" and vector.units == "raw" and vector.layers == [2, 5]

    mean = contrast_vector("m", smol.adapter, positives, negatives, "resid_post", [2], where="mean")
    assert not torch.allclose(mean.directions[2], vector.directions[2])
    ortho = contrast_vector("o", smol.adapter, positives, negatives, "resid_post", [2, 5], orthogonalize=True)
    for layer in (2, 5):
        site = Site(layer, "resid_post")
        neg_mean = torch.stack([smol.adapter.capture([site], x[None])[site][0, -1] for x in negatives]).mean(0)
        assert abs(float(ortho.directions[layer] @ neg_mean)) < 1e-3 * float(ortho.directions[layer].norm() * neg_mean.norm())
    projected = contrast_vector("p", smol.adapter, positives, negatives, "resid_post", [2], operation="project")
    assert projected.units == "fraction" and abs(float(projected.directions[2].norm()) - 1) < 1e-5


def test_vectors_round_trip_and_refuse_bad_names(tmp_path):
    model = {"model": "m", "family": "llama", "model_type": "llama", "d_model": 4, "n_layers": 3}
    vector = SteeringVector("v1", "ffn_out", "project", "fraction", {2: torch.tensor([0.0, 1, 0, 0])}, model,
                            {"method": "test"})
    vector.save(tmp_path)
    loaded = SteeringVector.load(tmp_path, "v1")
    assert loaded.metadata() == vector.metadata()
    torch.testing.assert_close(loaded.directions[2], vector.directions[2])
    with pytest.raises(VectorError, match="bad vector name"):
        SteeringVector("../evil", "ffn_out", "add", "raw", {0: torch.ones(4)}, model)
    with pytest.raises(VectorError, match="no vector named 'v2'.*known: v1"):
        SteeringVector.load(tmp_path, "v2")


def test_nearest_features_finds_the_decoder_row_itself():
    W_dec = torch.randn(50, 16)
    found = nearest_features(3 * W_dec[17], W_dec, top=3)
    assert found[0][0] == 17 and abs(found[0][1] - 1) < 1e-5 and found[1][1] < 1


FLASH = {"model": "deepseek_v4_flash", "family": "deepseek_v4", "model_type": "deepseek_v4", "d_model": 4096,
         "n_layers": 43}


def test_ds4_export_is_a_headerless_unit_row_table_with_a_sidecar(tmp_path):
    rows = {1: 5 * torch.randn(4096), 3: torch.randn(4096)}
    vector = SteeringVector("ds4vec", "ffn_out", "project", "fraction", rows, FLASH)
    paths = export_ds4(vector, tmp_path)
    assert paths[0].stat().st_size == 704_512  # the only size ds4 loads: 43 x 4096 float32s
    table = np.fromfile(paths[0], dtype="<f4").reshape(43, 4096)
    np.testing.assert_allclose(np.linalg.norm(table, axis=1), [0, 1, 0, 1] + [0] * 39, atol=1e-6)
    np.testing.assert_allclose(table[3], (rows[3] / rows[3].norm()).numpy(), atol=1e-6)
    sidecar = json.loads(paths[1].read_text())
    assert sidecar["format"] == "dialbox-ds4-export-v1"  # ours: ds4's own tag defines fewer keys
    assert (sidecar["shape"], sidecar["component"], sidecar["layers"]) == ([43, 4096], "ffn", [1, 3])


def test_ds4_export_refuses_what_ds4_would_not_load(tiny, tmp_path):
    with pytest.raises(VectorError, match=r"ds4 runs only DeepSeek-V4-Flash .* \(4 x 64\), which ds4 would refuse"):
        export_ds4(random_vector(tiny, "small", "ffn_out", [1, 3], 1.0, op="project"), tmp_path)
    with pytest.raises(VectorError, match="only at ffn_out or attn_out"):
        export_ds4(random_vector(tiny, "resid", "resid_post", [1], 1.0, op="project"), tmp_path)
    with pytest.raises(VectorError, match="change its meaning"):
        export_ds4(random_vector(tiny, "added", "ffn_out", [1], 1.0), tmp_path)
    assert not list(tmp_path.iterdir())


def test_gguf_control_vector_reads_back_as_llama_cpp_expects(smol, tmp_path):
    vector = random_vector(smol, "cvec", "resid_post", [1, 4, 7], 3.0)
    path = export_gguf(vector, tmp_path)[0]
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama" and fields["controlvector.layer_count"] == 3
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.4", "direction.7"]
    for layer in (1, 4, 7):
        np.testing.assert_array_equal(tensors[f"direction.{layer}"], vector.directions[layer].numpy())

    with pytest.raises(VectorError, match="layer 0, which llama.cpp cannot steer"):
        export_gguf(random_vector(smol, "zero", "resid_post", [0, 1], 1.0), tmp_path)
    with pytest.raises(VectorError, match="add at resid_post"):
        export_gguf(random_vector(smol, "proj", "resid_post", [1], 1.0, op="project"), tmp_path)
    with pytest.raises(VectorError, match="add at resid_post"):
        export_gguf(random_vector(smol, "ffn", "ffn_out", [1], 1.0), tmp_path)


def test_gguf_refuses_hyper_connection_models(tiny, tmp_path):
    with pytest.raises(VectorError, match="hyper-connection"):
        export_gguf(random_vector(tiny, "hc", "resid_post", [1], 1.0), tmp_path)


def steer_config(run, *overrides):
    return compose_config("steer", [f"run.runs_dir={run.parent}", f"run.run_name={run.name}", *overrides])


def test_export_stage_turns_a_feature_into_native_and_gguf_files(own_smol_run, smol, tmp_path):
    f = live_feature(smol, SMOL_SITE)
    native = export(steer_config(own_smol_run, f"export.feature={SMOL_SITE}/{f}", f"export.out_dir={tmp_path}"))
    meta = json.loads(native[1].read_text())
    assert (meta["site"], meta["operation"], meta["units"], meta["layers"]) == ("resid_post", "add", "max_act", [3])
    assert meta["source"]["features"] == [f"{SMOL_SITE}/{f}"] and meta["model"]["model"] == "smollm2_135m"
    max_act = smol.max_act(Site.parse(SMOL_SITE), f)
    saved = SteeringVector.load(tmp_path, f"{SMOL_SITE}-{f}").directions[3]
    torch.testing.assert_close(saved, smol.sae(Site.parse(SMOL_SITE)).W_dec[f].detach() * max_act)

    gguf_path = export(steer_config(own_smol_run, f"export.vector={SMOL_SITE}-{f}", "export.format=gguf",
                                    f"export.out_dir={tmp_path}"))[0]
    assert [t.name for t in gguf.GGUFReader(gguf_path).tensors] == ["direction.3"]
    with pytest.raises(VectorError, match="ds4 steers only at ffn_out"):
        export(steer_config(own_smol_run, f"export.vector={SMOL_SITE}-{f}", "export.format=ds4"))
    with pytest.raises(ValueError, match="exactly one of export.vector"):
        export(steer_config(own_smol_run, "export.format=ds4"))


def test_contrast_stage_saves_a_named_vector_and_lists_the_features_it_moves(own_smol_run, tmp_path, capsys):
    positives, negatives = tmp_path / "pos.txt", tmp_path / "neg.txt"
    positives.write_text("Answer in one word: what is rain?\nAnswer in one word: what is snow?\n")
    negatives.write_text("What is rain?\n# a comment\n\nWhat is snow?\n")
    vector = contrast(steer_config(own_smol_run, "contrast.name=oneword", f"contrast.positive_file={positives}",
                                   f"contrast.negative_file={negatives}", "contrast.layers=[2,3]"))
    assert vector.layers == [2, 3] and (own_smol_run / "vectors" / "oneword.safetensors").exists()
    out = capsys.readouterr().out
    assert f"features of the SAE at {SMOL_SITE} nearest oneword at L3" in out  # only L3 has an SAE
    listed = project(steer_config(own_smol_run, "project.target=oneword", "project.layer=3", "project.top=4"))
    assert listed[0].count(f"{SMOL_SITE}/") == 4
    with pytest.raises(ValueError, match="no prompt file"):
        contrast(steer_config(own_smol_run, "contrast.prompts=/nonexistent.txt"))
