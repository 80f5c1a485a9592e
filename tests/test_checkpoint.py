"""Hand-off files: metadata, atomic writes, encoder -> classifier, timm export, official import."""

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from livt import checkpoint as ckpt
from livt.checkpoint import (
    CheckpointError,
    arch_of,
    atomic_save_file,
    check_compatible,
    import_official,
    load_classifier,
    load_encoder,
    load_file_with_meta,
    save_model,
)
from livt.models import MAE, create_vit


class NotPlainData:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


def tiny_mae(patch_size: int = 8) -> MAE:
    torch.manual_seed(0)
    return MAE("vit_micro", 32, patch_size, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


def test_metadata_round_trip(tmp_path):
    model = create_vit("vit_micro", 32, 8, num_classes=3)
    path = tmp_path / "c.safetensors"
    save_model(model, path, "classifier", arch_of(model), class_counts=[5, 3, 1], class_names=["a", "b", "c"],
               dataset="synthetic", config={"optim": {"lr": 1e-3}})
    state, meta = load_file_with_meta(path)
    assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["kind"] == "classifier"
    assert meta["arch"] == {"name": "vit_micro", "embed_dim": 128, "depth": 4, "num_heads": 4,
                            "patch_size": 8, "img_size": 32, "num_classes": 3, "global_pool": "avg",
                            "head": "linear"}
    assert meta["class_counts"] == [5, 3, 1] and meta["config"]["optim"]["lr"] == 1e-3
    assert state.keys() == model.state_dict().keys()
    with pytest.raises(CheckpointError, match="disagrees.*patch_size"):
        save_model(model, path, "classifier", {**arch_of(model), "patch_size": 4})


def test_wrapper_prefixes_are_stripped_or_refused(tmp_path):
    model = create_vit("vit_micro", 32, 8)
    path = tmp_path / "e.safetensors"
    save_model(torch.compile(model), path, "encoder")
    state, _ = load_file_with_meta(path)
    assert state.keys() == model.state_dict().keys()
    stripped = ckpt.strip_wrapper_prefixes({"module._orig_mod.a.b": 1, "encoder._orig_mod.c": 2})
    assert stripped == {"a.b": 1, "encoder.c": 2}
    with pytest.raises(CheckpointError, match="wrapper prefixes"):
        atomic_save_file({"module.x": torch.zeros(1)}, path, {})


def test_atomic_save_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    atomic_save_file({"x": torch.ones(3)}, path, {"format_version": "1"})

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_file({"x": torch.zeros(3)}, path, {"format_version": "1"})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    assert torch.equal(load_file(path)["x"], torch.ones(3))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_file_with_meta(tmp_path / "nowhere.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="no livt metadata"):
        load_file_with_meta(plain)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(1)}, newer, metadata={"format_version": "2", "kind": "encoder", "arch": "{}"})
    with pytest.raises(CheckpointError, match="format_version 2 is newer"):
        load_file_with_meta(newer)
    pth = tmp_path / "official.pth"
    torch.save({"model": {}}, pth)
    with pytest.raises(CheckpointError, match="import_official"):
        load_file_with_meta(pth)


def test_check_compatible_lists_exactly_the_differing_fields():
    file_arch = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "img_size": 224,
                 "num_classes": 0}
    check_compatible(file_arch, {**file_arch, "img_size": 384}, "x")  # resolution may differ
    with pytest.raises(CheckpointError) as err:
        check_compatible(file_arch, {**file_arch, "embed_dim": 384, "num_heads": 6}, "pretrained.safetensors")
    msg = str(err.value)
    assert "embed_dim: file 768 vs config 384" in msg and "num_heads: file 12 vs config 6" in msg
    assert "depth" not in msg and "patch_size" not in msg and "pretrained.safetensors" in msg


@pytest.mark.parametrize("kind", ["encoder", "mae"])
def test_pretrain_to_finetune_hand_off(tmp_path, kind):
    mae = tiny_mae()
    path = tmp_path / f"{kind}.safetensors"
    save_model(mae, path, kind, arch_of(mae.encoder))
    torch.manual_seed(1)
    clf = create_vit("vit_micro", 32, 8, num_classes=10)
    fresh = {k: v.clone() for k, v in clf.state_dict().items()}
    report = load_encoder(clf, path)
    assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.unexpected_keys) == {"norm.weight", "norm.bias"}
    for key, value in mae.encoder.state_dict().items():
        if not key.startswith("norm."):
            assert torch.equal(clf.state_dict()[key], value), key
    for key in report.missing_keys:
        assert torch.equal(clf.state_dict()[key], fresh[key]), key
    assert clf.pos_embed.requires_grad  # learnable again for fine-tuning


def test_hand_off_refuses_another_architecture_and_interpolates_resolution(tmp_path):
    mae = tiny_mae()
    path = tmp_path / "encoder.safetensors"
    save_model(mae.encoder, path, "encoder")
    with pytest.raises(CheckpointError, match="patch_size: file 8 vs config 4"):
        load_encoder(create_vit("vit_micro", 32, 4, num_classes=10), path)
    with pytest.raises(CheckpointError, match="embed_dim: file 128 vs config 192"):
        load_encoder(create_vit("vit_tiny", 32, 8, num_classes=10), path)
    bigger = create_vit("vit_micro", 64, 8, num_classes=10)  # grid 4 -> 8
    load_encoder(bigger, path)
    assert bigger.pos_embed.shape == (1, 65, 128)
    assert torch.equal(bigger.pos_embed[:, 0], mae.encoder.pos_embed[:, 0])
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_load_encoder_names_stray_keys(tmp_path):
    mae = tiny_mae()
    state = {**mae.encoder.state_dict(), "extra.weight": torch.zeros(2)}
    path = tmp_path / "odd.safetensors"
    meta = {"format_version": "1", "kind": "encoder", "arch": json.dumps(arch_of(mae.encoder))}
    atomic_save_file(state, path, meta)
    with pytest.raises(CheckpointError, match=r"unexpected keys not allowed: \['extra.weight'\]"):
        load_encoder(create_vit("vit_micro", 32, 8, num_classes=10), path)


def test_classifier_file_loads_into_timm_and_back(tmp_path):
    torch.manual_seed(0)
    clf = create_vit("vit_tiny", 224, 16, num_classes=5).eval()
    path = tmp_path / "classifier.safetensors"
    save_model(clf, path, "classifier", arch_of(clf), dataset="synthetic")
    state, _ = load_file_with_meta(path)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool="avg")
    theirs.eval()
    report = theirs.load_state_dict(state, strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    again, meta = load_classifier(path)
    assert meta["dataset"] == "synthetic" and not again.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), clf(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(x), clf(x), atol=0, rtol=0)


def test_import_official_mae_and_finetuned(tmp_path):
    mae = tiny_mae()
    # the official MAE layout is livt's without the `encoder.` prefix; training args ride along
    official = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}
    src = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official, "epoch": 799, "args": argparse.Namespace(norm_pix_loss=True)}, src)
    arch = import_official(src, tmp_path / "mae.safetensors", "mae")
    assert arch["name"] == "vit_micro" and arch["patch_size"] == 8 and arch["img_size"] == 32
    assert arch["decoder_embed_dim"] == 64 and arch["decoder_depth"] == 1
    state, meta = load_file_with_meta(tmp_path / "mae.safetensors")
    assert meta["kind"] == "mae" and state.keys() == mae.state_dict().keys()
    import_official(src, tmp_path / "enc.safetensors", "encoder")
    clf = create_vit("vit_micro", 32, 8, num_classes=4)
    load_encoder(clf, tmp_path / "enc.safetensors")
    assert torch.equal(clf.blocks[3].mlp.fc2.weight, mae.encoder.blocks[3].mlp.fc2.weight)

    torch.manual_seed(2)
    tuned = create_vit("vit_micro", 32, 8, num_classes=4).eval()
    src = tmp_path / "livt_finetuned.pth"
    torch.save({"model": tuned.state_dict(), "args": argparse.Namespace(nb_classes=4)}, src)
    assert import_official(src, tmp_path / "clf.safetensors", "classifier")["num_classes"] == 4
    model, _ = load_classifier(tmp_path / "clf.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="head"):
        import_official(src, tmp_path / "x.safetensors", "encoder")


def test_import_official_refuses_to_unpickle_objects(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": NotPlainData()}, src)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        import_official(src, tmp_path / "out.safetensors", "mae")
    assert not (tmp_path / "out.safetensors").exists()
