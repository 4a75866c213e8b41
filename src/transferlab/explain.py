"""Grad-CAM: where in the image the model looked for a class (the ``grad-cam`` package, pytorch_grad_cam).

Computed in fp32 on the CPU with a model of its own (the library hooks the target layer), with gradients
flowing from the input (``requires_grad_()`` on it, none on the weights), so a frozen backbone's
activations carry gradients too; never under ``inference_mode``. The target layer is the backbone's
``cam_layer`` (chosen per family by :mod:`transferlab.models.backbones`: the last feature map before
pooling). The heat map covers the centre crop the model sees.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TransferlabError
from .models.preprocessing import center_crop, eval_batch
from .run import Run


@dataclass
class Explanation:
    class_index: int
    label: str
    probability: float
    heatmap: np.ndarray  # (input_size, input_size) float32 in [0, 1]
    crop: np.ndarray  # (input_size, input_size, 3) uint8: what the model saw

    def overlay_png(self, alpha: float = 0.45) -> bytes:
        """The heat map (jet colours) over the crop, as PNG bytes."""
        from PIL import Image
        from pytorch_grad_cam.utils.image import show_cam_on_image

        picture = show_cam_on_image(self.crop.astype(np.float32) / 255.0, self.heatmap, use_rgb=True,
                                    image_weight=1.0 - alpha)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        return buffer.getvalue()


class Explainer:
    """Grad-CAM heat maps for a run's model; one call at a time (the hooks hold the last activations)."""

    def __init__(self, run_dir: str | os.PathLike):
        try:
            from pytorch_grad_cam import GradCAM
        except ImportError:
            raise TransferlabError("Grad-CAM needs the grad-cam package: pip install 'transferlab[serve]'") from None
        self.run = Run.load(run_dir, precision="fp32", device="cpu")
        model = self.run.model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.cam = GradCAM(model=model, target_layers=[model.backbone.cam_module()])
        self.classes = self.run.classes
        self._lock = threading.Lock()

    def explain(self, image: np.ndarray, label: str | None = None) -> Explanation:
        """Heat map for ``label`` (default: the model's top class) on a decoded CHW uint8 image."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if label is not None and label not in self.classes:
            raise TransferlabError(f"class '{label}' is not one of the model's classes ({', '.join(self.classes)})")
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        x = eval_batch([tensor], self.run.preprocess).requires_grad_()
        with self._lock, torch.enable_grad():
            logits = self.run.model(x)
            probs = torch.softmax(logits.detach(), 1)[0]
            index = self.classes.index(label) if label is not None else int(probs.argmax())
            heatmap = self.cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]
        crop = center_crop(tensor, self.run.preprocess.input_size).permute(1, 2, 0).numpy()
        return Explanation(index, self.classes[index], float(probs[index]), heatmap.astype(np.float32), crop)


def write_overlays(explainer: Explainer, records: list[dict], out_dir: str | os.PathLike) -> list[str]:
    """For each predicted record, the heat map of its predicted class over its image, as
    OUT_DIR/<image name>_gradcam.png (names made unique); returns the files written."""
    from pathlib import Path

    from .data.decode import decode_array
    from .io.files import check_writable_dir, write_bytes

    out = check_writable_dir(out_dir, "--gradcam")
    written, used = [], set()
    for row in records:
        if "error" in row:
            continue
        stem = Path(row["path"]).stem
        name, k = f"{stem}_gradcam.png", 1
        while name in used:
            k += 1
            name = f"{stem}-{k}_gradcam.png"
        used.add(name)
        image = decode_array(row["path"], explainer.run.preprocess)
        write_bytes(out / name, explainer.explain(image, row["label"]).overlay_png())
        written.append(str(out / name))
    return written
