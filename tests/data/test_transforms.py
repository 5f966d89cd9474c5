import pytest
import torch

from weakseg.data.transforms import (
    CenterCrop,
    RandomAffine,
    RandomCrop,
    RandomFlipRotate,
    Resize,
    build_augmentations,
)
from weakseg.errors import DataError


def aligned_sample(h=16, w=16):
    """Image channels that are functions of the mask: any misalignment between them shows."""
    mask = torch.randint(0, 8, (h, w))
    mask[0, 0] = 255
    s2 = mask.float()[None].repeat(13, 1, 1) / 10
    s1 = mask.float()[None].repeat(2, 1, 1) / 10 + 1
    return {"image": torch.cat([s2, s1]), "mask": mask, "id": "t"}


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_flip_rotate_moves_s2_s1_and_mask_together(h, w):
    torch.manual_seed(0)
    for _ in range(20):
        out = RandomFlipRotate()(aligned_sample(h, w))
        m = out["mask"]
        assert out["image"].shape == (15, h, w)
        valid = m != 255
        assert torch.allclose(out["image"][0][valid], m[valid].float() / 10)
        assert torch.allclose(out["image"][14][valid], m[valid].float() / 10 + 1)


def test_flip_rotate_draws_each_of_the_eight_dihedral_elements_exactly():
    """The output is exactly the input under one of the 8 flips/rotations (computed here with torch's own ops,
    the path a GPU tensor takes), the same element for image, mask and valid, and every element occurs."""
    torch.manual_seed(1)
    sample = aligned_sample(8, 8)
    sample["image"] = torch.arange(15 * 64, dtype=torch.float32).reshape(15, 8, 8)
    sample["valid"] = torch.rand(8, 8) > 0.3

    def moved(x, flip_w, k):  # the group: (optional horizontal flip, then k quarter turns)
        return torch.rot90(x.flip(-1) if flip_w else x, k, (-2, -1))

    elements = [(f, k) for f in (False, True) for k in range(4)]
    seen = set()
    for _ in range(60):
        out = RandomFlipRotate()(sample)
        hits = [e for e in elements if torch.equal(out["image"], moved(sample["image"], *e))]
        assert len(hits) == 1
        assert torch.equal(out["mask"], moved(sample["mask"], *hits[0]))
        assert torch.equal(out["valid"], moved(sample["valid"], *hits[0]))
        assert out["image"].is_contiguous() and out["mask"].dtype == torch.int64
        seen.add(hits[0])
    assert seen == set(elements)


def test_affine_keeps_s1_s2_and_mask_aligned_and_fills_ignore():
    torch.manual_seed(0)
    t = RandomAffine(degrees=20, translate_px=5, p=1.0)
    sample = aligned_sample(32, 32)
    sample["mask"] = torch.zeros(32, 32, dtype=torch.long)
    sample["mask"][:, 16:] = 3
    sample["image"] = torch.cat([sample["mask"].float()[None].repeat(13, 1, 1), sample["mask"].float()[None].repeat(2, 1, 1)])
    out = t(sample)
    m, img = out["mask"], out["image"]
    assert (m == 255).any()  # pixels moved in from outside are ignored
    inside = m != 255
    agree = (img[0][inside].round() == m[inside].float()).float().mean()
    assert agree > 0.95
    assert torch.equal(img[0], img[13])  # S2 and S1 through one grid


def test_crops_record_offsets_and_check_sizes():
    torch.manual_seed(0)
    sample = aligned_sample(20, 24)
    out = CenterCrop((16, 16))(sample)
    assert out["crop"] == (2, 4) and out["image"].shape == (15, 16, 16)
    assert torch.equal(out["mask"], sample["mask"][2:18, 4:20])
    rc = RandomCrop((16, 16))(sample)
    top, left = rc["crop"]
    assert torch.equal(rc["mask"], sample["mask"][top : top + 16, left : left + 16])
    with pytest.raises(DataError, match="smaller than the model input 32x32"):
        RandomCrop((32, 32))(sample)


def test_resize_changes_image_only():
    out = Resize((8, 8))(aligned_sample(16, 16))
    assert out["image"].shape == (15, 8, 8) and out["mask"].shape == (16, 16)


def test_unknown_augmentation_lists_choices():
    with pytest.raises(DataError, match=r"unknown augmentation 'mixup'; choose from \['affine', 'fliprot'\]"):
        build_augmentations(["mixup"])
