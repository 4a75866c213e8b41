"""Inference engines: the one owner of how an eval-mode forward pass runs.

``torch`` runs the module itself (under the precision policy's autocast and memory layout).
``onnxruntime`` exports the module to ONNX in memory (about a second for EfficientNet-Lite0) and runs it with
ONNX Runtime, whose fused CPU kernels run EfficientNet-Lite0 in fp32 2-2.5x faster than eager PyTorch on this
project's 2-core machine; outputs agree with torch to ~1e-5. ``auto`` picks ONNX Runtime for fp32 on a CPU
when it is installed and there are enough images to repay the export, torch otherwise (bf16 on a CPU with
native bf16, CUDA, MPS).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TransferlabError
from ..models.preprocessing import TTA_VIEWS, PreprocessConfig, eval_batch
from ..options import ENGINES
from ..progress import progress_bar
from .export import onnx_bytes
from .onnx_session import cpu_session, onnxruntime_available
from .precision import Policy

log = logging.getLogger("transferlab")
# Below this many images the export (~1 s) costs more than ONNX Runtime saves (~15 ms per image).
MIN_IMAGES_FOR_EXPORT = 64


def resolve_engine(engine: str, policy: Policy) -> str:
    """``auto`` -> the engine that runs this policy fastest; an explicit choice is checked."""
    if engine not in ENGINES:
        raise TransferlabError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    suited = policy.device == "cpu" and policy.precision == "fp32"
    if engine == "onnxruntime":
        if not suited:
            raise TransferlabError(f"--engine onnxruntime: runs fp32 on the CPU only (this run: {policy.precision} "
                                   f"on {policy.device}); use --engine torch")
        if not onnxruntime_available():
            raise TransferlabError("--engine onnxruntime: the onnxruntime and onnx packages are needed "
                                   "(pip install onnxruntime onnx)")
        return engine
    if engine == "auto":
        return "onnxruntime" if suited and onnxruntime_available() else "torch"
    return engine


class _Traceable(nn.Module):
    """Wraps a bound method (``model.features``) as a module, for export."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def engine_of(fn: Callable) -> str:
    """The engine a function from :func:`forward_fn` runs on (an export that failed ran on torch)."""
    return "onnxruntime" if isinstance(fn, OnnxRunner) else "torch"


def engine_for(engine: str, policy: Policy, n_images: int) -> str:
    """The engine that runs ``n_images`` images: ``auto`` uses ONNX Runtime where it is faster and the
    export pays (at least :data:`MIN_IMAGES_FOR_EXPORT` images)."""
    resolved = resolve_engine(engine, policy)
    if engine == "auto" and n_images < MIN_IMAGES_FOR_EXPORT:
        return "torch"
    return resolved


class OnnxRunner:
    """An eval-mode module exported to ONNX (in memory, batch axis dynamic) and run by ONNX Runtime."""

    def __init__(self, module: nn.Module, input_size: int):
        self.session = cpu_session(onnx_bytes(module, input_size), torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous().numpy()  # ONNX Runtime takes NCHW, whatever the policy's layout
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


# owner module -> {graph name: (weights signature, runner)}: re-used while the weights are unchanged (TTA
# views, predict batches), rebuilt after they change (a fine-tuned model). Bounded by the owners' lifetimes
# (weak keys); the lock makes look-up and export one step for threads sharing a model (a web server).
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()


def _weights_signature(module: nn.Module) -> tuple:
    # _version counts in-place changes (optimizer steps, load_state_dict), data_ptr catches replaced tensors
    return tuple((t.data_ptr(), t._version) for t in [*module.parameters(), *module.buffers()])


def forward_fn(module: nn.Module | Callable, policy: Policy, engine: str, input_size: int, n_images: int,
               owner: nn.Module | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function batch -> outputs for ``module`` in eval mode, on the engine ``engine`` resolves to.
    ``module`` may be a bound method of ``owner`` (``model.features``). With ``auto``, fewer than
    :data:`MIN_IMAGES_FOR_EXPORT` images run on torch, and a failed export (a model with data-dependent
    control flow) falls back to torch with a log line."""
    if engine_for(engine, policy, n_images) != "onnxruntime":
        return module
    key = owner if owner is not None else module
    name = getattr(module, "__name__", "forward")
    with _RUNNERS_LOCK:
        signature = (input_size, _weights_signature(key))
        runners = _RUNNERS.setdefault(key, {})
        if name in runners and runners[name][0] == signature:
            return runners[name][1]
        traceable = module if isinstance(module, nn.Module) else _Traceable(module, key)
        try:
            runner = OnnxRunner(traceable.eval(), input_size)
        except Exception as exc:
            if engine == "onnxruntime":
                detail = str(exc).splitlines()[0] if str(exc) else ""
                raise TransferlabError(f"--engine onnxruntime: export failed ({type(exc).__name__}: {detail}); "
                                       "use --engine torch") from None
            log.info("onnxruntime: export failed (%s); running the model with torch", type(exc).__name__)
            return module
        runners[name] = (signature, runner)
        return runner


@torch.no_grad()
def predict_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor],
                       preprocess: PreprocessConfig, policy: Policy, batch_size: int = 64,
                       desc: str = "", view: str = "center") -> torch.Tensor:
    """Apply ``fn`` (a module in eval mode) to one view of decoded images, batch by batch; returns
    float32 on CPU."""
    outputs = []
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, total=len(starts), desc=desc, enabled=bool(desc)):
        x = policy.prepare_input(eval_batch(images[start:start + batch_size], preprocess, view))
        with policy.autocast():
            outputs.append(fn(x).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def average_views(logits_per_view: list[torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation: the mean of the views' class probabilities, returned as log-probabilities
    (so that ``softmax`` of the result gives the averaged probabilities back)."""
    probs = torch.stack([torch.softmax(logits, dim=1) for logits in logits_per_view]).mean(0)
    return probs.clamp_min(1e-12).log()


@dataclass(frozen=True)
class InferenceOptions:
    """How a trained model is run: ``engine`` (see the module doc), ``tta`` (average the probabilities of
    :data:`~transferlab.models.preprocessing.TTA_VIEWS`), ``batch_size``."""

    engine: str = "auto"
    tta: bool = False
    batch_size: int = 64


@torch.no_grad()
def predict_logits(model, images: list[torch.Tensor], policy: Policy, options: InferenceOptions | None = None,
                   desc: str = "", n_images: int | None = None, engines: set[str] | None = None) -> torch.Tensor:
    """Logits of ``model`` (eval mode, preprocessing ``model.backbone.preprocess``) for decoded images; with
    ``options.tta`` the log of the probabilities averaged over the views. ``n_images``: how many images the
    caller will push through in all, which decides whether an ONNX export pays (default ``len(images)``).
    ``engines``: the engine that ran is added to it."""
    options = options or InferenceOptions()
    preprocess = model.backbone.preprocess
    views = TTA_VIEWS if options.tta else ("center",)
    total = (n_images if n_images is not None else len(images)) * len(views)
    fn = forward_fn(model, policy, options.engine, preprocess.input_size, total)
    if engines is not None:
        engines.add(engine_of(fn))
    outputs = [predict_in_batches(fn, images, preprocess, policy, options.batch_size,
                                  f"{desc} ({view})" if desc and options.tta else desc, view) for view in views]
    return average_views(outputs) if options.tta else outputs[0]


class LogitsAndFeatures(nn.Module):
    """A trained model's logits and pooled features from one forward pass, as one concatenated output
    (so that every engine, ONNX Runtime's single-output runner included, runs it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.features(x)
        return torch.cat([self.model.head(features).float(), features.float()], dim=1)


# model -> its LogitsAndFeatures wrapper: one per model, so the engine's exported graph is re-used
_JOINT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def predict_logits_and_features(model, images: list[torch.Tensor], policy: Policy,
                                options: InferenceOptions | None = None, desc: str = "",
                                n_images: int | None = None, engines: set[str] | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict_logits` and the pooled features of the centre view (what an "unknown" score is
    computed from) in the same pass; with ``options.tta`` the other views add their probabilities."""
    if not images:
        return torch.empty(0, 0), torch.empty(0, 0)
    options = options or InferenceOptions()
    preprocess = model.backbone.preprocess
    views = TTA_VIEWS if options.tta else ("center",)
    total = (n_images if n_images is not None else len(images)) * len(views)
    with _RUNNERS_LOCK:
        joint = _JOINT.setdefault(model, LogitsAndFeatures(model))
    fn = forward_fn(joint, policy, options.engine, preprocess.input_size, total)
    if engines is not None:
        engines.add(engine_of(fn))
    both = predict_in_batches(fn, images, preprocess, policy, options.batch_size, desc)
    n_classes = both.shape[1] - _feature_width(model)
    logits, features = both[:, :n_classes], both[:, n_classes:]
    if not options.tta:
        return logits, features
    plain = forward_fn(model, policy, options.engine, preprocess.input_size, total)
    per_view = [logits] + [predict_in_batches(plain, images, preprocess, policy, options.batch_size, view=view)
                           for view in views[1:]]
    return average_views(per_view), features


def _feature_width(model) -> int:
    """The number of feature columns: the head's input width (its first Linear layer)."""
    first = next(m for m in model.head.modules() if isinstance(m, nn.Linear))
    return int(first.in_features)
