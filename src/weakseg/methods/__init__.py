"""WSSS methods, one module each, all reaching the model only through the backbone contract.

- :mod:`~weakseg.methods.attention_clustering`: the sparse ViT paper's clustered attention of kept heads.
- :mod:`~weakseg.methods.gradcam`: Grad-CAM on the ViT (the baseline).
- :mod:`~weakseg.methods.top_class`: the floor, every pixel = the top predicted class.
"""

from weakseg.methods.attention_clustering import attention_pseudomasks, head_maps_from_model, relabel_regions
from weakseg.methods.common import PseudomaskResult, nearest_fill, oracle_label_sets, predicted_label_sets
from weakseg.methods.gradcam import gradcam_maps, gradcam_pseudomasks
from weakseg.methods.top_class import top_class_pseudomasks

__all__ = [
    "PseudomaskResult",
    "attention_pseudomasks",
    "gradcam_maps",
    "gradcam_pseudomasks",
    "head_maps_from_model",
    "nearest_fill",
    "oracle_label_sets",
    "predicted_label_sets",
    "relabel_regions",
    "top_class_pseudomasks",
]
