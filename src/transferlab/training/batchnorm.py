"""Re-estimate a backbone's BatchNorm statistics on the training images (``--bn-update``).

ImageNet's running means and variances describe ImageNet photos; on data far from them (aerial views,
grey-scale scans, medical images) the normalised activations drift off the range the later layers were
trained on. Recomputing the statistics on the new data before training (AdaBN, Li et al. 2016) is one pass
over the training images, forward only, in :func:`torch.optim.swa_utils.update_bn` (cumulative averages,
momentum restored afterwards). The evaluation centre crop is used, so the statistics match what testing sees,
and the pass is deterministic: the same images in the same order give the same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..models.preprocessing import PreprocessConfig, eval_batch
from ..progress import progress_bar
from ..runtime.precision import Policy

log = logging.getLogger("transferlab")


def update_batchnorm(backbone: nn.Module, images: Sequence[torch.Tensor], preprocess: PreprocessConfig, policy: Policy,
                     batch_size: int = 64) -> int:
    """Replace the running statistics of every BatchNorm layer of ``backbone`` by those of ``images``; returns
    how many layers were updated (0: the backbone has none, nothing changes). The modules' train/eval modes
    are restored by the caller's strategy (update_bn leaves the whole backbone in its previous mode)."""
    from torch.optim.swa_utils import update_bn

    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or not len(images):
        return 0

    def batches() -> Iterator[torch.Tensor]:
        starts = range(0, len(images), batch_size)
        for start in progress_bar(starts, total=len(starts), desc="BatchNorm statistics"):
            yield policy.prepare_input(eval_batch(images[start:start + batch_size], preprocess))

    with torch.no_grad(), policy.autocast():
        update_bn(batches(), backbone)
    log.info("BatchNorm statistics of %d layers re-estimated on %d training images", len(layers), len(images))
    return len(layers)
