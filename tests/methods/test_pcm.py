"""``--method pcm``: the maps it reads, the label masking with max-normalisation, the label-free mode, high-res."""

from __future__ import annotations

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods import get_method
from weakseg.methods.pcm import pcm_class_maps
from weakseg.models.architectures import build_classifier, get_architecture
from weakseg.models.vit import ViTConfig

C = 3


def pcm_model(head: str = "linear"):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=4,
                    num_classes=C, gated=False, **{**get_architecture("pcm").model_fields(C),
                                                   "patch_classifier": head})
    return build_classifier(cfg)


def test_defaults_and_architectures() -> None:
    m = get_method("pcm")
    o = m.options
    assert (o.rule, o.normalize, o.scales, o.flip, o.masking) == ("argmax", "max", "2.5", "off", "none")
    assert m.architectures == ("pcm",) and m.trains == "pcm"
    with pytest.raises(ConfigError, match="masking"):
        get_method("pcm", masking="some")


def test_maps_are_the_patch_softmax_in_eval_mode_and_mode_is_restored() -> None:
    model = pcm_model("bilstm").train()
    x = torch.rand(2, 3, 16, 16)
    maps = pcm_class_maps(model, x)
    assert model.training
    model.eval()
    expected = model.patch_probabilities(model.forward_features(x))
    torch.testing.assert_close(maps, expected)
    labels = torch.tensor([[True, False, True], [False, True, True]])
    restricted = get_method("pcm", masking="labels", scales="1").class_maps(model, x, labels)
    assert torch.all(restricted[0, 1] == 0) and torch.all(restricted[1, 0] == 0)
    torch.testing.assert_close(restricted[0, 2], expected[0, 2])


def test_label_masking_max_normalises_each_class_before_the_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 x 2 patch grid, 3 classes: raw argmax says class 0 on both patches; class 1 is a label whose maximum is
    # small, so after dividing by its max it wins patch 1 (the original's maxnorm), class 2 is absent.
    probs = torch.tensor([[[[0.6, 0.5]], [[0.1, 0.3]], [[0.3, 0.2]]]])  # (1, C, 1, 2)
    import weakseg.methods.pcm as pcm

    monkeypatch.setattr(pcm, "pcm_patch_probabilities", lambda model, images: probs)
    model = pcm_model()
    labels = torch.tensor([[True, True, False]])
    image_probs = torch.tensor([[0.9, 0.8, 0.1]])
    res = get_method("pcm", masking="labels", scales="1").pseudomasks(model, torch.zeros(1, 3, 4, 8), image_probs,
                                                                     labels, (1, 2))
    assert res.masks.tolist() == [[[0, 1]]]  # 0.6/0.6=1 > 0.1/0.3 ; 0.5/0.6=0.83 < 0.3/0.3=1
    free = get_method("pcm", masking="none", scales="1").pseudomasks(model, torch.zeros(1, 3, 4, 8), image_probs, labels,
                                                         (1, 2))
    assert free.masks.tolist() == [[[0, 0]]]  # plain argmax over all classes, labels not read
    torch.testing.assert_close(torch.from_numpy(free.confidence), torch.tensor([[[0.3, 0.2]]]))
    assert free.reason == ["pcm_all_classes"] and free.used_labels.tolist() == [[True, False, False]]


def test_background_channel_competes_without_a_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = torch.tensor([[[[0.7, 0.2]], [[0.3, 0.8]], [[0.0, 0.0]]]])  # background = channel 0
    import weakseg.methods.pcm as pcm

    monkeypatch.setattr(pcm, "pcm_patch_probabilities", lambda model, images: probs)
    method = get_method("pcm", masking="labels", scales="1")
    method.bind_dataset(["background", "cat", "dog"], 0)
    res = method.pseudomasks(pcm_model(), torch.zeros(1, 3, 4, 8), torch.tensor([[1.0, 0.9, 0.0]]),
                             torch.tensor([[True, True, False]]), (1, 2))
    assert res.masks.tolist() == [[[0, 1]]]


def test_high_resolution_inference_reads_a_finer_grid() -> None:
    model = pcm_model().eval()
    seen = []
    original = model.forward_features

    def spy(x, *a, **k):
        seen.append(tuple(x.shape[-2:]))
        return original(x, *a, **k)

    model.forward_features = spy  # type: ignore[method-assign]
    labels = torch.ones(1, C, dtype=torch.bool)
    res = get_method("pcm", scales="2.5").pseudomasks(model, torch.rand(1, 3, 16, 16), torch.full((1, C), 0.9),
                                                      labels, (16, 16))
    assert seen == [(40, 40)] and res.masks.shape == (1, 16, 16)


def test_refuses_other_classifiers() -> None:
    from weakseg.models.vit import build_vit

    with pytest.raises(ConfigError, match="--arch pcm"):
        get_method("pcm").check_model(build_vit(num_classes=C), "x.ckpt")
