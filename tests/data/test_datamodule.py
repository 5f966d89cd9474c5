"""Start-up checks of the data module: every faulty tile is reported before training, from file headers only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.conftest import TINY_VIT_FLAGS
from tests.data.test_folder import make_folder
from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.data.datamodule import WeakSegDataModule, scan_tiles, tile_faults
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.errors import DataError

VAL = "ROIs0000_validation"


def write_raster(path: Path, bands: int, size: int, dtype: str = "int16") -> None:
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=bands, dtype=dtype) as dst:
        dst.write(np.ones((bands, size, size), dtype=dtype))


def file_of(root: Path, sensor: str, tile: int) -> Path:
    return root / VAL / f"{sensor}_validation" / f"{VAL}_{sensor}_0_p{tile}.tif"


@pytest.fixture()
def faulty_dfc(tiny_dfc: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the tiny data with five faulty tiles, each broken in another way; returns the bad files."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dfc, root)
    bad = [file_of(root, "s1", 1), file_of(root, "dfc", 2), file_of(root, "s2", 3), file_of(root, "dfc", 4),
           file_of(root, "s2", 5)]
    bad[0].unlink()  # missing S1 file
    write_raster(bad[1], 1, 16)  # label raster of another size than its image
    write_raster(bad[2], 12, 32)  # S2 with 12 bands
    bad[3].write_bytes(b"not a tiff")  # unreadable label
    write_raster(bad[4], 13, 24)  # tile smaller than the model input (and than its S1 and label)
    return root, bad


def test_every_faulty_tile_is_reported_at_once_with_its_files(faulty_dfc: tuple[Path, list[Path]]) -> None:
    root, bad = faulty_dfc
    dm = WeakSegDataModule(root, modality="s1s2", img_size=(32, 32), train_split="validation:train",
                           val_split="validation:holdout")
    with pytest.raises(DataError) as e:
        dm.check_tiles()
    message = str(e.value)
    for path in bad:
        assert path.name in message, path.name
    assert f"{bad[0]} is missing (the S1 file of {VAL}_s2_0_p1.tif)" in message
    assert f"{bad[1].name} is 16x16 but {VAL}_s2_0_p2.tif is 32x32" in message
    assert f"{bad[2].name} has 12 bands, expected 13" in message
    assert "smaller than the model input 32x32 (--imgsize)" in message
    assert message.count("tile ROIs0000_validation_p") == 5  # one line per faulty tile, no good tile listed
    assert "cannot be used" in message and "validation:train" in message


def test_s2_only_ignores_s1_files_and_good_data_passes(faulty_dfc: tuple[Path, list[Path]], tiny_dfc: Path) -> None:
    root, bad = faulty_dfc
    faults, count = scan_tiles(open_dataset("dfc2020", root, "validation", modality="s2"), (32, 32))
    assert count == 4 and not any(bad[0].name in f for f in faults)  # S1 is not read without s1s2
    assert tile_faults(open_dataset("dfc2020", tiny_dfc, "validation", modality="s1s2"), (32, 32)) == []


def test_the_check_reads_headers_only(tiny_dfc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pixels(self, i):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(DFC2020Dataset, "_read_image", no_pixels)
    monkeypatch.setattr(DFC2020Dataset, "_read_mask", no_pixels)
    WeakSegDataModule(tiny_dfc, modality="s1s2", img_size=(32, 32), train_split="validation:train",
                      val_split="test").check_tiles()


def test_folder_dataset_band_counts_and_mask_sizes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", n=4, bands=5, size=16)
    write_raster(root / "images" / "tile_002.tif", 4, 16, "uint16")
    (root / "masks" / "tile_003.png").unlink()
    write_raster(root / "masks" / "tile_003.tif", 1, 8, "uint8")
    faults = tile_faults(open_dataset("folder", root, "all"), (16, 16))
    assert len(faults) == 2
    assert "tile_002.tif has 4 bands, expected 5" in faults[0]
    assert "tile_003.tif is 8x8 but tile_003.tif is 16x16" in faults[1]


def test_train_command_stops_at_start_up_before_reading_pixels(faulty_dfc: tuple[Path, list[Path]], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root, bad = faulty_dfc

    def fail(*args, **kwargs):
        pytest.fail("tiles were read before the start-up check")

    monkeypatch.setattr(WeakSegDataModule, "prepare_stats", fail)
    code = main(["train", "--datadir", str(root), "--multimodal", "--output_dir", str(tmp_path / "run"),
                 *TINY_VIT_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 4 of 19 tile(s) of split 'validation:train' and 1 of 5 tile(s) of "
                                        "split 'validation:holdout' cannot be used:")
    assert all(path.name in err for path in bad) and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
