"""Barlow Twins views (weakseg.data.ssl_views): shapes, each augmentation's effect, cross-modal band split,
reproducibility under a seed, and the unlabelled image folder reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.data.normalization import Normalize
from weakseg.data.ssl_views import TwoViewDataset, ViewAugment, gaussian_blur
from weakseg.data.unlabelled import UnlabelledImageFolder, check_readable
from weakseg.errors import ConfigError, DataError


def _identity(size: tuple[int, int] = (16, 16), **kw: object) -> ViewAugment:
    settings = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, band_mean_p=0.0, blur_p=0.0,
                    flip_p=0.0)
    settings.update(kw)
    return ViewAugment(size, **settings)


def test_views_have_the_model_size_for_any_tile() -> None:
    aug = ViewAugment((16, 16))
    for shape in ((3, 16, 16), (13, 40, 24), (2, 9, 9)):
        assert aug(torch.rand(*shape)).shape == (shape[0], 16, 16)


def test_whole_crop_without_jitter_is_the_tile_up_to_a_rotation() -> None:
    x = torch.rand(3, 16, 16)
    torch.manual_seed(0)
    y = _identity()(x)
    assert any(torch.allclose(y, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5) for k in range(4))


def test_jitter_is_an_affine_map_per_band_with_its_own_factors() -> None:
    torch.manual_seed(1)
    x = torch.rand(4, 16, 16)
    y = _identity().jitter(x)
    factors = []
    for b in range(4):  # y_b = a_b x_b + c_b
        A = torch.stack([x[b].flatten(), torch.ones(256)], dim=1)
        sol = torch.linalg.lstsq(A, y[b].flatten()[:, None]).solution.flatten()
        torch.testing.assert_close(A @ sol, y[b].flatten(), atol=1e-5, rtol=1e-5)
        assert 0.6 - 1e-6 <= float(sol[0]) <= 1.4 + 1e-6
        factors.append(float(sol[0]))
    assert len({round(f, 4) for f in factors}) == 4


def test_jitter_shift_is_drawn_in_units_of_the_band_std() -> None:
    """The shift is brightness x U(-1, 1) x the band's unbiased std: the same draws by hand give the same image,
    with torch.std as the reference of the two-pass std the jitter computes."""
    x = torch.rand(3, 12, 10) * torch.tensor([1.0, 5.0, 0.1])[:, None, None]
    aug = _identity()
    y = aug.jitter(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    factor = 1 + aug.contrast * (2 * torch.rand(3, 1, 1, generator=gen) - 1)
    shift = aug.brightness * (2 * torch.rand(3, 1, 1, generator=gen) - 1)
    mean, std = x.mean(dim=(-2, -1), keepdim=True), x.std(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(y, (x - mean) * factor + mean + shift * std, atol=1e-6, rtol=1e-5)
    flat = torch.full((1, 4, 4), 2.0)  # a constant band: std 0 (clamped to 1e-6) -> no visible shift, no NaN
    torch.testing.assert_close(aug.jitter(flat, torch.Generator().manual_seed(0)), flat, atol=1e-5, rtol=0)


def test_band_mean_view_and_blur() -> None:
    x = torch.rand(5, 16, 16)
    torch.manual_seed(0)
    y = _identity(band_mean_p=1.0)(x)
    assert torch.allclose(y, y[:1].expand_as(y))  # every band the same: the spectrum is gone
    const = torch.full((2, 12, 12), 3.0)
    torch.testing.assert_close(gaussian_blur(const, 1.5), const)  # a constant stays constant
    spike = torch.zeros(1, 15, 15)
    spike[0, 7, 7] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert float(blurred.sum()) == pytest.approx(1.0, rel=1e-5) and 0 < float(blurred[0, 7, 7]) < 1
    assert float(blurred[0, 7, 8]) == pytest.approx(float(blurred[0, 8, 7]))  # isotropic


class _Reader:
    def __init__(self, n: int = 4, bands: int = 15) -> None:
        rng = np.random.default_rng(0)
        self.images = [rng.random((bands, 20, 20), dtype=np.float32) for _ in range(n)]
        self.ids = [f"t{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, i: int) -> np.ndarray:
        return self.images[i]


def test_cross_modal_views_split_s2_and_s1_and_a_seed_fixes_the_views() -> None:
    reader = _Reader()
    reader.images[0][-2:] = 7.0  # S1 bands of tile 0 are constant 7, the S2 bands are below 1
    ds = TwoViewDataset(reader, "cross_modal", (16, 16), Normalize("none"), s1_chans=2)
    torch.manual_seed(3)
    item = ds[0]
    assert item["view1"].shape == (13, 16, 16) and item["view2"].shape == (2, 16, 16)
    assert float(item["view1"].max()) < 2 and float(item["view2"].mean()) > 3  # S1 is view 2
    torch.manual_seed(3)
    again = ds[0]
    torch.testing.assert_close(again["view1"], item["view1"])
    plain = TwoViewDataset(reader, "augment", (16, 16), Normalize("none"))
    torch.manual_seed(3)
    pair = plain[1]
    assert pair["view1"].shape == pair["view2"].shape == (15, 16, 16)
    assert not torch.allclose(pair["view1"], pair["view2"])  # two draws
    with pytest.raises(ConfigError, match="--multimodal"):
        TwoViewDataset(reader, "cross_modal", (16, 16), Normalize("none"), s1_chans=0)


def test_unlabelled_folder_reads_images_and_skips_unreadable_ones(tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"a{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    reader = UnlabelledImageFolder(folder)
    assert reader.ids == ["a0", "a1", "a2", "broken"]
    image = reader.read_image(1)
    assert image.shape == (3, 10, 12) and float(image.max()) == pytest.approx(40 / 255)
    usable, skipped = check_readable(reader, folder)
    assert usable == [0, 1, 2] and skipped[0][0] == "broken" and "broken.jpg" in skipped[0][1]


def test_unlabelled_folder_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        UnlabelledImageFolder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"{empty} holds no image"):
        UnlabelledImageFolder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"no readable image in {bad}"):
        check_readable(UnlabelledImageFolder(bad), bad)
