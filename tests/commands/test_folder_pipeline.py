"""Bring-your-own data through the whole CLI: train, pseudomasks, evaluate on a folder dataset."""

import csv
import json

from tests.data.test_folder import make_folder
from weakseg.cli import main


def test_folder_dataset_through_train_pseudomasks_evaluate(tmp_path, capsys):
    data = make_folder(tmp_path / "mydata", n=8, bands=4, size=32)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--datadir", str(data), "--train_split", "all", "--val_split",
                 "none", "--output_dir", str(run), "--imgsize", "32", "--patch_size", "8", "--embed_dim", "24",
                 "--depth", "2", "--num_heads", "4", "--num_epochs", "1", "--train_batch_size", "4",
                 "--prune"]) == 0
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(run / "checkpoints" / "last.ckpt"), "--datadir",
                 str(data), "--split", "all", "--output", str(masks), "--oracle"]) == 0
    rows = list(csv.DictReader((masks / "manifest.csv").open()))
    assert len(rows) == 8 and rows[0]["labels"] == "water;forest"
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--predictions", str(masks), "--datadir", str(data), "--split", "all",
                 "--dataset", "folder", "--output", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert "miou" in json.dumps(result)
    out = capsys.readouterr().out
    assert "water" in out.lower() and "mIoU" in out
