"""weakseg: weakly supervised semantic segmentation with Vision Transformers.

Layout by role (mirrored in ``tests/``):

- ``weakseg.data``: readers (DFC2020, bring-your-own folders), the synthetic Sentinel-1/2 generator,
  joint augmentation, normalisation and the Lightning data module.
- ``weakseg.models``: the gated ViT backbone (the one contract every method uses), Hard Concrete gates, UNet.
- ``weakseg.tasks``: Lightning modules (multi-label classification with L0 pruning, segmentation).
- ``weakseg.methods``: one module per WSSS method (attention clustering, Grad-CAM, top-class floor).
- ``weakseg.evaluation``: confusion matrices, OA / AA / IoU / mIoU, multi-folder comparison.
- ``weakseg.viz``: figures (attention grids, gate maps, pseudomask panels).
- ``weakseg.commands``: one module per ``weakseg`` sub-command; ``weakseg.cli`` wires them.
"""

__version__ = "0.1.0"
