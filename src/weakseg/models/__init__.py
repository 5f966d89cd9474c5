"""Models: the gated ViT (the backbone contract), Hard Concrete gates, checkpoint loading, UNet."""

from weakseg.models.hard_concrete import HardConcreteGate, l0_penalty
from weakseg.models.pretrained import load_pretrained
from weakseg.models.unet import UNet
from weakseg.models.vit import BackboneOutput, GatedViT, ViTConfig, build_vit

__all__ = ["BackboneOutput", "GatedViT", "HardConcreteGate", "UNet", "ViTConfig", "build_vit", "l0_penalty",
           "load_pretrained"]
