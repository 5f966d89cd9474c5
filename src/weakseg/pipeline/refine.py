"""Stage 3: refine pseudomasks by training a UNet on them, iteratively; plus the fully supervised upper bound.

Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023, close their pipeline with "multiple stages of supervised training of a segmentation model,
utilizing the pseudomasks generated in the previous iteration as supervision", and show iterations 0 (the raw
attention pseudomasks), 1 and 2. They compare against the same segmenter trained on the pixel-level ground
truth ("fully supervised"). The paper publishes no settings; the project defaults (reference ``sparse_vit.md``
section 5) are a standard UNet (:class:`weakseg.models.unet.UNet`), cross-entropy ignoring 255, the UNet's
argmax on the pseudo-labelled tiles as the next pseudomasks, no post-processing; one iteration by default (a
second lowered the holdout mIoU, :data:`DEFAULT_ITERATIONS`). The
recipe is AdamW at lr 3e-3 with cosine decay over 30 epochs per iteration: on the demo's 256 tiles of 64x64, a
UNet trained on the ground truth for 10 epochs at a constant 1e-3 (the earlier default) reached only 54 mIoU
on its own training tiles, 30 epochs at 3e-3 cosine reach 74, so the shorter recipe measured underfitting
rather than refinement.

Iteration ``i >= 1`` trains a fresh UNet (seed ``seed + i``) on the tiles of ``split`` with the masks of
iteration ``i - 1`` as targets, then predicts every tile of ``split`` (the next pseudomasks) and, when given,
the held-out ``eval_split``. Inputs are normalised like the classifier's (its checkpoint's ``data_config``),
so the UNet sees what the ViT saw. There is no validation loop: choosing epochs on ground truth would be
model selection with labels that weak supervision does not have.

**Image labels.** The tiles a UNet predicts have image labels: the classifier that made the pseudomasks
(``classifier``, the ``--model_checkpoint``) gives each tile a probability per class. With ``label_weighting``
(the default when a classifier is given) every prediction is ``argmax_c softmax_c(UNet) * p_c(classifier)``:
the UNet says where, the classifier which classes. A UNet alone mislabels whole regions with look-alike classes
the tile does not contain and learns the masks' errors (on the built-in data, from class-attention masks of 57.5
mIoU: 54.2 alone, 62.8 weighted on the pseudo-labelled tiles; 46.7 and 54.6 on the holdout; 3 seeds,
``benchmarks/defaults.py``); weighting is what makes the next pseudomasks better than the input. The held-out split is predicted the same way (the pipeline a user runs on
new tiles: classifier + UNet), and the UNet alone is scored too (``eval_unet_alone``), so both are reported.

**Confidence.** Target pixels whose confidence is below ``min_confidence`` are set to 255, so the loss ignores
them (:func:`weakseg.data.targets.load_targets`). Iteration 1 reads ``<pseudomasks>/confidence/<id>.tif``
(written by ``weakseg pseudomasks``; a folder without ``confidence/`` counts every pixel as confident), and
every iteration writes the softmax probability of its predicted class beside its masks, so iteration
``i >= 2`` applies the same rule to the previous UNet's output. The supervised run trains on the ground truth
unfiltered. Each stage reports the fraction of target pixels the loss ignored. Layout of ``output_dir``::

    config.yaml / config_supervised.yaml   resolved settings (weakseg.config.save_resolved)
    summary.json                           per-iteration scores (both modes, merged)
    iter0/scores.json                      scores of the input pseudomasks (when ground truth exists)
    iter{i}/masks/<id>.tif                 predictions on ``split``: the pseudomasks of iteration i
    iter{i}/masks/confidence/<id>.tif      their confidence (softmax probability of the class, x 255)
    iter{i}/eval_masks/<id>.tif            predictions on ``eval_split`` (and ``confidence/``)
    iter{i}/eval_unet_alone/<id>.tif       the UNet's own argmax on ``eval_split`` (with label weighting)
    iter{i}/scores.json                    {"train_tiles": ..., "eval_split": ...} (evaluate_folder results)
    iter{i}/unet.ckpt                      the UNet, weights only (SegmentationTask.load_from_checkpoint)
    iter{i}/metrics.csv                    training loss per step and epoch (CSVLogger)
    iter{i}/done.json                      completion marker, written last (with the ignored fraction)
    supervised/...                         the same for the UNet trained on the ground truth
    figures/                               refine_panels.png, miou_per_iteration.png (``figures``; run_figures.py)

**Resume** (:mod:`weakseg.pipeline.stages`). Every mask and JSON file is written atomically, and ``done.json``
last, so a folder with the marker is complete. A re-run skips finished stages whose recorded settings match
(other settings are refused before anything is written); a stage without the marker is redone from scratch,
and so is every later iteration (its inputs changed). Finished stages that lack predictions for a newly
requested ``eval_split`` get them from their saved UNet without retraining. Raising ``iterations`` on a re-run
trains only the new ones.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from weakseg.config import save_resolved
from weakseg.data import open_dataset
from weakseg.data.base import shared_tiles
from weakseg.data.datamodule import build_transform
from weakseg.data.normalization import NORMALIZATION_MODES, compute_band_stats
from weakseg.data.targets import TargetMasks, TargetTiles, load_targets
from weakseg.errors import ConfigError, DataError
from weakseg.evaluation.compare import evaluate_folder
from weakseg.evaluation.metrics import format_scores_table
from weakseg.io import atomic_write_json, folder_lock, make_dir, process_rank
from weakseg.pipeline.mask_writer import MaskFolderWriter, clear_mask_folder
from weakseg.pipeline.progress import EpochLog, csv_logger
from weakseg.pipeline.run_figures import write_refine_figures
from weakseg.pipeline.stages import (
    DONE_FILE,
    check_reusable,
    invalidate_later_iterations,
    iteration_dir,
    mark_done,
    read_json,
    stage_fingerprint,
    unmark,
)
from weakseg.pipeline.tables import format_refine_table, refine_progress_line
from weakseg.tasks.segmentation import (
    SEGMENTATION_LOSSES,
    SEGMENTATION_MODELS,
    VIT_ENCODER_MODELS,
    SegmentationTask,
)
from weakseg.runtime import default_num_workers

log = logging.getLogger(__name__)

SCORES_FILE = "scores.json"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "unet.ckpt"
SUPERVISED_DIR = "supervised"
#: Folder of a stage with the UNet's own argmax on the eval split (when predictions are label-weighted).
ALONE_DIR = "eval_unet_alone"
#: Score keys copied into the summary (the full evaluate_folder results stay in each stage's scores.json).
SUMMARY_SCORE_KEYS = ("miou", "oa", "aa", "coverage")
#: Cache the scaled training tiles in memory (DFC2020 reader, no workers) when they take less than this.
CACHE_LIMIT_BYTES = 1 << 30

# UNet recipe. 10 epochs at a constant 1e-3 left the UNet underfitted even on the ground truth of its own
# training tiles (54 mIoU on the demo's 256 tiles of 64x64); 30 epochs at 3e-3 with cosine decay reach 74.
DEFAULT_EPOCHS = 30
DEFAULT_LR = 3e-3
DEFAULT_LR_SCHEDULE = "cosine"
#: Refinement iterations. The paper shows two; on the holdout of the built-in data a second iteration lowered the
#: mIoU of the label-weighted UNet (54.6 -> 53.3; paired +1.3 ± 1.2 for one, 3 seeds, ``benchmarks/defaults.py``).
DEFAULT_ITERATIONS = 1
LR_SCHEDULES = ("constant", "cosine", "poly")
#: Training recipe of each ``--model`` (optimizer, lr, lr_schedule, encoder_lr_scale): the defaults ``weakseg
#: refine`` uses for that model when neither YAML nor a flag sets them. The UNet's is the measured recipe above.
#: Segmenter's is the one measured from scratch on the quality benchmark's WeakTr masks
#: (``benchmarks/weaktr_phase2.py``, README "WeakTr's phase 2"): the UNet's AdamW 3e-3 with cosine decay and the
#: encoder at the full lr. WeakTr's own phase-2 recipe (``weaktr.md`` 4.2: SGD with Nesterov momentum 0.9, base lr
#: 1e-4, encoder x 0.1, poly decay) fine-tunes an ImageNet DeiT-S; with ``--pretrained`` give it as flags
#: (``--optimizer sgd --lr_schedule poly --learning_rate 1e-4 --encoder_lr_scale 0.1``): from scratch it learns
#: next to nothing in 30 epochs. The heads on the ViT tokens (``vit_linear``, ``setr_naive``, ``setr_pup``;
#: :mod:`weakseg.models.seg_heads`) start from Segmenter's recipe (not measured for them).
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "unet": {"optimizer": "adamw", "lr": DEFAULT_LR, "lr_schedule": DEFAULT_LR_SCHEDULE},
    **{name: {"optimizer": "adamw", "lr": DEFAULT_LR, "lr_schedule": DEFAULT_LR_SCHEDULE, "encoder_lr_scale": 1.0}
       for name in VIT_ENCODER_MODELS},
}


def model_recipe(model: str) -> dict[str, Any]:
    """A copy of :data:`MODEL_RECIPES` ``[model]`` (RefineConfig fields)."""
    if model not in MODEL_RECIPES:
        raise ConfigError(f"unknown model {model!r} (--model); choose from {list(MODEL_RECIPES)}")
    return dict(MODEL_RECIPES[model])


#: Target pixels with a confidence below this are ignored by the loss; the CLI flag shares this default. 0.0 keeps
#: every pixel: with label weighting, ignoring the pixels below 0.1, 0.2 or 0.3 of the class-attention margin
#: (23-44 % of them) did not raise the holdout mIoU beyond the seed spread (paired differences against 0:
#: +0.9 ± 1.7, -0.9 ± 0.2, +0.5 ± 1.2; 3 seeds, ``benchmarks/defaults.py``): the margin does not find the masks'
#: main errors, whole regions of a wrongly predicted label.
DEFAULT_MIN_CONFIDENCE = 0.0


@dataclass
class RefineConfig:
    """Settings of a refinement (or fully supervised) run.

    Attributes:
        datadir: dataset root.
        pseudomasks: folder of iteration-0 masks, one ``<id>.tif`` per tile of ``split`` and optionally
            ``confidence/<id>.tif`` (``weakseg pseudomasks``); may be None with ``supervised``.
        output_dir: where iterations, scores and the summary go.
        dataset: reader kind, "dfc2020" or "folder".
        split: the pseudo-labelled split the UNet trains on (DFC2020: "validation", as the classifier).
        eval_split: optional held-out split to predict and score after each iteration (DFC2020: "test").
        modality: "s2" or "s1s2".
        normalization: "none", "per_image_max" or "standardize"; take it from the classifier's
            ``data_config``.
        band_stats: (mean, std) per band for "standardize"; computed on ``split`` when missing.
        iterations: refinement iterations after iteration 0 (the paper shows 2; default 1, measured).
        epochs: training epochs per iteration (30; 10 underfits, see the module docstring).
        batch_size: training batch per device (prediction uses twice this).
        lr: AdamW learning rate (3e-3).
        lr_schedule: "cosine" (decay to 0 over the iteration's steps, the default) or "constant".
        widths: UNet stage widths; tiles not divisible by ``2 ** (len(widths) - 1)`` are padded inside the UNet.
        seed: iteration ``i`` is seeded with ``seed + i`` (weights, shuffling, augmentation); the supervised
            run uses ``seed + 1``: it starts from the weights of iteration 1, and only the targets differ.
        num_workers: data loader workers.
        accelerator, num_devices: Lightning Trainer settings (``num_devices > 1`` uses DDP).
        supervised: train on the ground-truth masks of ``split`` instead (the upper bound), into
            ``output_dir/supervised``; refinement iterations are not run in this mode.
        augment: joint random flips and 90-degree rotations of image and mask while training.
        min_confidence: in [0, 1]; target pixels whose confidence is below it become 255 (ignored by the
            loss), in every iteration; not applied to the supervised run's ground truth.
        classifier: the classifier checkpoint that made the pseudomasks (image-label probabilities).
        label_weighting: weight the UNet's class probabilities by the classifier's (module docstring); needs
            ``classifier``.
        figures: draw ``output_dir/figures/`` at the end (:func:`weakseg.pipeline.run_figures.write_refine_figures`:
            per-iteration panels, mIoU per iteration); a drawing failure is a warning, never a failed run.
        figure_tiles: tiles of ``split`` in the panels (a fixed seeded sample).
        model: ``"unet"`` (the default for tiles) or ``"segmenter"`` (WeakTr's phase 2: a ViT encoder of
            ``patch_size`` / ``embed_dim`` / ``depth`` / ``num_heads``, optionally from a local timm / DeiT checkpoint
            ``pretrained`` or from a weakseg classifier checkpoint's backbone ``encoder_checkpoint``, and a mask
            transformer of ``decoder_depth`` blocks; :mod:`weakseg.models.segmenter`). The optimiser settings'
            defaults here are the UNet's; ``weakseg refine`` puts the chosen model's recipe
            (:data:`MODEL_RECIPES`, :func:`model_recipe`) under the YAML and flag values, and a caller building
            the config in code passes ``**model_recipe("segmenter")`` for the same. ``"vit_linear"``,
            ``"setr_naive"`` and ``"setr_pup"`` are heads on the patch tokens of the same encoder (same encoder
            settings; :mod:`weakseg.models.seg_heads`, Zheng et al., SETR, CVPR 2021): the ViT-encoder models,
            :data:`~weakseg.tasks.segmentation.VIT_ENCODER_MODELS`.
        loss: ``"ce"`` (cross-entropy ignoring 255) or ``"clip"`` (WeakTr's gradient-clipping loss with
            ``clip_start`` and ``clip_window``; :mod:`weakseg.tasks.losses`).
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (Nesterov, momentum 0.9, no weight decay: WeakTr's phase 2,
            with ``lr_schedule: poly``); ``encoder_lr_scale`` multiplies the ViT encoder's learning rate (WeakTr
            0.1).
        freeze_encoder: a ViT-encoder model trains its decoder / head only: the encoder (random, ``pretrained``
            or ``encoder_checkpoint``) is not trained and stays in eval mode (a linear probe with ``vit_linear``).
        window, stride: sliding-window prediction of Segmenter (tiles no larger than the window: one pass).
        predict_scales, predict_flip: prediction views whose softmax is averaged (multi-scale + flip).
    """

    datadir: str
    pseudomasks: str | None
    output_dir: str
    dataset: str = "dfc2020"
    split: str = "validation"
    eval_split: str | None = None
    modality: str = "s2"
    normalization: str = "none"
    band_stats: list[list[float]] | None = None
    iterations: int = DEFAULT_ITERATIONS
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 16
    lr: float = DEFAULT_LR
    lr_schedule: str = DEFAULT_LR_SCHEDULE
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    seed: int = 0
    num_workers: int = field(default_factory=default_num_workers)  # from the machine (weakseg.runtime)
    accelerator: str = "auto"
    num_devices: int = 1
    num_nodes: int = 1
    supervised: bool = False
    augment: bool = True
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    classifier: str | None = None
    label_weighting: bool = True
    figures: bool = True
    figure_tiles: int = 4
    model: str = "unet"
    loss: str = "ce"
    clip_start: float = 1.2
    clip_window: int | None = None
    optimizer: str = "adamw"
    encoder_lr_scale: float = 0.1
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 6
    decoder_depth: int = 2
    pretrained: str | None = None
    encoder_checkpoint: str | None = None
    window: int | None = None
    stride: int | None = None
    predict_scales: list[float] = field(default_factory=lambda: [1.0])
    predict_flip: bool = False
    freeze_encoder: bool = False


def _tile_geometry(reader: Any, split: str, widths: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the split's tiles, checked before anything trains.

    Every tile's size is read from its file header (milliseconds per tile): the tiles are batched and their
    masks checked against one size, so they must share it, and a mismatch is reported now, naming tiles of each
    size, not as an error minutes into training. A size that is not a multiple of the UNet's divisor is padded
    inside the UNet (:class:`weakseg.models.unet.UNet` ``pad_input``), said once here.
    """
    if not reader.ids:
        raise DataError(f"split {split!r} has no tiles")
    channels, height, width = reader.read_image(0).shape
    sizes = tile_sizes(reader)
    if len(sizes) > 1:
        listed = "; ".join(f"{h}x{w}: {len(ids)} tile(s), e.g. {ids[0]!r}" for (h, w), ids in sizes.items())
        raise ConfigError(
            f"tiles of split {split!r} differ in size ({listed}); refinement needs tiles of one size: resize or "
            "crop them to one size (pseudomasks and evaluation accept any sizes)"
        )
    divisor = 2 ** (len(widths) - 1)
    if height % divisor or width % divisor:
        log.info("tiles of split %r are %dx%d, not multiples of %d (a UNet with %d widths pools %d times): padded "
                 "by reflection inside the UNet, predictions cropped back", split, height, width, divisor,
                 len(widths), len(widths) - 1)
    return int(channels), (int(height), int(width))


def tile_sizes(reader: Any) -> dict[tuple[int, int], list[str]]:
    """(height, width) -> ids of the tiles of that size, from the image files' headers."""
    import rasterio

    sizes: dict[tuple[int, int], list[str]] = {}
    with rasterio.Env():
        for i, tile_id in enumerate(reader.ids):
            path = reader.source_path(i)
            try:
                with rasterio.open(path) as src:
                    size = (int(src.height), int(src.width))
            except rasterio.errors.RasterioIOError as e:
                raise DataError(f"{path}: cannot be read ({e})") from e
            sizes.setdefault(size, []).append(tile_id)
    return sizes


# ---- Lightning plumbing ------------------------------------------------------------------------------------
def _trainer(
    cfg: RefineConfig, stage_dir: Path | None, callbacks: list[Any], steps_per_epoch: int
) -> L.Trainer:
    return L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.num_devices, num_nodes=cfg.num_nodes,
        strategy="ddp" if cfg.num_devices * cfg.num_nodes > 1 else "auto",
        logger=csv_logger(stage_dir) if stage_dir is not None else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=max(1, min(50, steps_per_epoch)), callbacks=callbacks,
    )


def _is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


# ---- the run ----------------------------------------------------------------------------------------------
class _Context:
    """What every stage shares: readers, tile geometry, the data config and the output folder."""

    def __init__(self, cfg: RefineConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.train_reader = self._open(cfg.split, cache=True)
        self.channels, self.tile_size = _tile_geometry(self.train_reader, cfg.split, cfg.widths)
        self.num_classes = len(self.train_reader.class_names)
        self.eval_reader = self._open(cfg.eval_split, cache=False) if cfg.eval_split else None
        self.eval_tile_size = self.tile_size
        if self.eval_reader is not None:
            channels, self.eval_tile_size = _tile_geometry(self.eval_reader, str(cfg.eval_split), cfg.widths)
            if channels != self.channels:
                raise DataError(
                    f"tiles of eval split {cfg.eval_split!r} have {channels} channels but those of split "
                    f"{cfg.split!r} have {self.channels}"
                )
        #: Tiles of the eval split that are training tiles too: its scores are then not held out.
        self.eval_overlap = (len(shared_tiles(self.train_reader, self.eval_reader))
                             if self.eval_reader is not None else 0)
        if self.eval_overlap and _is_rank_zero():
            log.warning("warning: %s", self.overlap_message())
        band_stats = cfg.band_stats
        if cfg.normalization == "standardize" and band_stats is None:
            band_stats = [list(v) for v in compute_band_stats(self.train_reader)]
            log.info("band statistics computed on split %r (the classifier's were not given)", cfg.split)
        self.band_stats = band_stats
        self.data_config: dict[str, Any] = {
            "normalization": cfg.normalization, "band_stats": band_stats,
            "augmentations": ["fliprot"] if cfg.augment else [],
        }
        self._label_probs: dict[str, Mapping[str, np.ndarray]] = {}

    def _open(self, split: str, cache: bool) -> Any:
        """A reader of ``split``; the DFC2020 reader keeps small training splits in memory across epochs."""
        cfg = self.cfg
        reader = open_dataset(cfg.dataset, cfg.datadir, split, modality=cfg.modality)
        if cache and cfg.dataset == "dfc2020" and cfg.num_workers == 0 and reader.ids:
            if reader.read_image(0).nbytes * len(reader.ids) <= CACHE_LIMIT_BYTES:
                reader = open_dataset(cfg.dataset, cfg.datadir, split, modality=cfg.modality, cache=True)
        return reader

    def overlap_message(self) -> str:
        assert self.eval_reader is not None
        return (f"{self.eval_overlap} of the {len(self.eval_reader.ids)} tiles of eval split {self.cfg.eval_split!r} "
                f"are training tiles of split {self.cfg.split!r}: its scores are not held-out scores")

    @property
    def has_gt(self) -> bool:
        return bool(getattr(self.train_reader, "has_masks", False))

    @property
    def eval_has_gt(self) -> bool:
        return self.eval_reader is not None and bool(getattr(self.eval_reader, "has_masks", False))

    def fingerprint(self, supervised: bool) -> dict[str, Any]:
        return stage_fingerprint(self.cfg, self.band_stats, supervised)

    @property
    def weighted(self) -> bool:
        return bool(self.cfg.label_weighting and self.cfg.classifier)

    def label_probabilities(self, eval_split: bool) -> Mapping[str, np.ndarray]:
        """The classifier's class probabilities of every tile of the split, by tile id (computed once)."""
        key = "eval" if eval_split else "train"
        if key not in self._label_probs:
            split = self.cfg.eval_split if eval_split else self.cfg.split
            self._label_probs[key] = classifier_probabilities(Path(str(self.cfg.classifier)), self.cfg.dataset,
                                                              self.cfg.datadir, str(split))
        return self._label_probs[key]

    def load_targets(self, folder: Path) -> TargetMasks:
        """The masks of ``folder`` for the training split, with low-confidence pixels set to 255."""
        cfg = self.cfg
        return load_targets(folder, self.train_reader, cfg.split, self.tile_size, cfg.min_confidence)

    def predict_loader(self, eval_split: bool) -> DataLoader:
        reader = self.eval_reader if eval_split else self.train_reader
        size = self.eval_tile_size if eval_split else self.tile_size
        tiles = TargetTiles(reader, None, build_transform("predict", size, self.data_config), size)
        return DataLoader(tiles, batch_size=2 * self.cfg.batch_size, num_workers=self.cfg.num_workers)


@torch.no_grad()
def classifier_probabilities(checkpoint: Path, dataset: str, datadir: str, split: str,
                             batch_size: int = 64) -> Mapping[str, np.ndarray]:
    """Sigmoid class probabilities of a classifier for every tile of ``split``, with its own input settings."""
    from weakseg.tasks.classification import load_classifier

    task = load_classifier(checkpoint)
    model = task.model.eval()
    data_cfg = dict(task.hparams.get("data_config") or {})
    reader = open_dataset(dataset, datadir, split, modality=data_cfg.get("modality", "s2"),
                          transform=build_transform("predict", task.model_config.img_size, data_cfg))
    probs = np.zeros((len(reader), 0), dtype=np.float32)  # (N, C) once the first batch gives C
    for start in range(0, len(reader), batch_size):
        indices = range(start, min(len(reader), start + batch_size))
        images = torch.stack([reader[i]["image"] for i in indices])
        batch = model(images).sigmoid().numpy()  # (b, C)
        if start == 0:
            probs = np.zeros((len(reader), batch.shape[1]), dtype=batch.dtype)
        probs[start : start + len(indices)] = batch
    return LabelProbabilities(reader.ids, probs)


class LabelProbabilities(Mapping[str, np.ndarray]):
    """Tile id -> the classifier's (C,) class probabilities, kept as one (N, C) array.

    Why: a dict of one (C,) array per tile pays a ~110-byte array header per tile for 32 bytes of probabilities
    (1.6 MB per 10,000 tiles with the dict); one array and an id -> row index take 0.8 MB.
    """

    def __init__(self, ids: Sequence[str], probs: np.ndarray) -> None:
        if probs.ndim != 2 or probs.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} tile ids but probabilities of shape {probs.shape}")
        self._row = {tile: k for k, tile in enumerate(ids)}
        self.probs = probs  # (N, C)

    def __getitem__(self, tile_id: str) -> np.ndarray:
        return self.probs[self._row[tile_id]]  # (C,) view

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


class LabelWeightedSegmenter(L.LightningModule):
    """Prediction of a UNet weighted by the classifier's image-label probabilities (module docstring).

    ``pred`` = argmax of ``softmax(UNet) * p`` with ``prob`` its share of the weighted sum (the confidence of the
    next iteration), and ``pred_alone`` = the UNet's own argmax.
    """

    def __init__(self, task: SegmentationTask, label_probs: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.task = task
        self.label_probs = label_probs

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        # The task's own prediction views (sliding window, scales, flip): the same softmax it predicts alone.
        soft = self.task.predict_probabilities(batch["image"])  # (B, K, H, W)
        probs = torch.as_tensor(np.stack([self.label_probs[i] for i in batch["id"]]), device=soft.device)  # (B, K)
        weighted = soft * probs[:, :, None, None].to(soft.dtype)
        value, pred = weighted.max(dim=1)  # (B, H, W)
        share = value / weighted.sum(dim=1).clamp_min(1e-12)
        return {"id": batch["id"], "pred": pred.to(torch.uint8), "prob": share.float(),
                "pred_alone": soft.argmax(dim=1).to(torch.uint8)}


def _score_summary(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if scores is None else {key: scores.get(key) for key in SUMMARY_SCORE_KEYS}


def _fit(task: SegmentationTask, trainer: L.Trainer, loader: DataLoader) -> None:
    """Train (a module-level function so tests can check that resumed stages do not train)."""
    with warnings.catch_warnings():
        # No validation loader on purpose: validating on ground truth would be model selection on labels that
        # weak supervision does not have.
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
        if getattr(task.model, "freeze_encoder", False):  # a frozen encoder is kept in eval mode on purpose
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        trainer.fit(task, train_dataloaders=loader)


def _predict_into(ctx: _Context, trainer: L.Trainer, writer: MaskFolderWriter, task: SegmentationTask,
                  folder: Path, eval_split: bool) -> None:
    """Predict the split into ``folder`` (weighted by the image labels when configured; for the eval split the
    UNet's own argmax also goes to ``<stage>/eval_unet_alone``)."""
    alone = folder.parent / ALONE_DIR if (eval_split and ctx.weighted) else None
    folder.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        clear_mask_folder(folder)
        if alone is not None:
            alone.mkdir(parents=True, exist_ok=True)
            clear_mask_folder(alone)
    trainer.strategy.barrier()  # no rank writes before the old masks are gone
    writer.out_dir, writer.reader, writer.alone_dir = folder, ctx.eval_reader if eval_split else ctx.train_reader, alone
    module: L.LightningModule = LabelWeightedSegmenter(task, ctx.label_probabilities(eval_split)) if ctx.weighted else task
    trainer.predict(module, dataloaders=ctx.predict_loader(eval_split), return_predictions=False)
    trainer.strategy.barrier()  # every rank's masks are on disk before anyone reads or scores them


def _score_stage(ctx: _Context, stage_dir: Path) -> dict[str, Any]:
    """evaluate_folder on the stage's train-tile masks and eval-split masks, where ground truth exists."""
    train_scores = evaluate_folder(stage_dir / "masks", ctx.train_reader) if ctx.has_gt else None
    eval_scores = alone_scores = None
    if ctx.eval_has_gt and (stage_dir / "eval_masks").is_dir():
        eval_scores = evaluate_folder(stage_dir / "eval_masks", ctx.eval_reader)
        if ctx.weighted and (stage_dir / ALONE_DIR).is_dir():
            alone_scores = evaluate_folder(stage_dir / ALONE_DIR, ctx.eval_reader)
    return {"train_tiles": train_scores, "eval_split": eval_scores, "eval_unet_alone": alone_scores}


def _log_targets(stage: str, targets: TargetMasks, min_confidence: float | None) -> None:
    unlabelled = targets.ignored_fraction - targets.low_confidence_fraction
    if min_confidence is None:  # ground truth: nothing is filtered
        log.info("%s targets: %.1f%% of the pixels ignored (no-data in the ground truth)", stage,
                 100 * targets.ignored_fraction)
    else:
        log.info("%s targets: %.1f%% of the pixels ignored (%.1f%% unlabelled, %.1f%% below min_confidence "
                 "%g)", stage, 100 * targets.ignored_fraction, 100 * unlabelled,
                 100 * targets.low_confidence_fraction, min_confidence)


def _train_stage(ctx: _Context, stage_dir: Path, seed: int, targets: TargetMasks, stage: str,
                 supervised: bool) -> dict[str, Any]:
    """Train a fresh UNet on ``targets``, predict the split (and eval split), score, mark done."""
    cfg = ctx.cfg
    stage_dir.mkdir(parents=True, exist_ok=True)
    unmark(stage_dir)  # a crash below must not leave an old marker
    _log_targets(stage, targets, None if supervised else cfg.min_confidence)
    L.seed_everything(seed, workers=True, verbose=False)
    task = build_segmentation_task(cfg, ctx.channels, ctx.num_classes, ctx.tile_size)
    transform = build_transform("train", ctx.tile_size, ctx.data_config)  # full-tile crop, flips, normalise
    train_tiles = TargetTiles(ctx.train_reader, targets.masks, transform, ctx.tile_size)
    loader = DataLoader(
        train_tiles, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
        drop_last=len(train_tiles) > cfg.batch_size, persistent_workers=cfg.num_workers > 0,
    )
    writer = MaskFolderWriter()
    trainer = _trainer(cfg, stage_dir, [writer, EpochLog(stage, batch_metric="train_loss_step")],
                       steps_per_epoch=len(loader))
    t0 = time.time()
    _fit(task, trainer, loader)
    train_seconds = time.time() - t0
    train_loss = trainer.callback_metrics.get("train_loss_epoch")
    tmp = stage_dir / f".{MODEL_FILE}.tmp"
    trainer.save_checkpoint(tmp, weights_only=True)
    if trainer.is_global_zero:
        os.replace(tmp, stage_dir / MODEL_FILE)
    t0 = time.time()
    _predict_into(ctx, trainer, writer, task, stage_dir / "masks", eval_split=False)
    if ctx.eval_reader is not None:
        _predict_into(ctx, trainer, writer, task, stage_dir / "eval_masks", eval_split=True)
    predict_seconds = time.time() - t0
    done = {
        "stage": stage, "fingerprint": ctx.fingerprint(supervised), "eval_split": cfg.eval_split,
        "train_tiles": len(train_tiles), "epochs": cfg.epochs,
        "train_loss": None if train_loss is None else float(train_loss),
        "train_seconds": round(train_seconds, 2), "predict_seconds": round(predict_seconds, 2),
        "ignored_fraction": targets.ignored_fraction,
        "low_confidence_fraction": targets.low_confidence_fraction,
        "targets_have_confidence": targets.has_confidence,
    }
    if _is_rank_zero():
        atomic_write_json(stage_dir / SCORES_FILE, _score_stage(ctx, stage_dir))
        mark_done(stage_dir, done)
    return done


def _add_eval_predictions(ctx: _Context, stage_dir: Path, done: dict[str, Any]) -> dict[str, Any]:
    """Predict a newly requested eval split with a finished stage's saved UNet (no retraining)."""
    model_path = stage_dir / MODEL_FILE
    if not model_path.is_file():
        raise DataError(
            f"{stage_dir} was finished without eval split {ctx.cfg.eval_split!r} and has no {MODEL_FILE} to "
            f"predict it with; delete {stage_dir / DONE_FILE} to retrain that stage"
        )
    task = SegmentationTask.load_from_checkpoint(model_path, map_location="cpu")
    writer = MaskFolderWriter()
    trainer = _trainer(ctx.cfg, None, [writer], steps_per_epoch=1)
    _predict_into(ctx, trainer, writer, task, stage_dir / "eval_masks", eval_split=True)
    done = {**done, "eval_split": ctx.cfg.eval_split}
    if _is_rank_zero():
        atomic_write_json(stage_dir / SCORES_FILE, _score_stage(ctx, stage_dir))
        mark_done(stage_dir, done)
    return done


def _finished(ctx: _Context, stage_dir: Path, supervised: bool) -> dict[str, Any] | None:
    """:func:`~weakseg.pipeline.stages.check_reusable`, plus predictions for a newly requested eval split."""
    done = check_reusable(stage_dir, ctx.fingerprint(supervised))
    if done is not None and ctx.cfg.eval_split and done.get("eval_split") != ctx.cfg.eval_split:
        done = _add_eval_predictions(ctx, stage_dir, done)
    return done


def _entry(iteration: int | str, masks: Path, eval_masks: Path | None, scores: dict[str, Any] | None,
           done: dict[str, Any] | None, resumed: bool) -> dict[str, Any]:
    scores = scores or {}
    done = done or {}
    return {
        "iteration": iteration,
        "masks": str(masks),
        "eval_masks": str(eval_masks) if eval_masks is not None and eval_masks.is_dir() else None,
        "train_scores": _score_summary(scores.get("train_tiles")),
        "eval_scores": _score_summary(scores.get("eval_split")),
        "eval_unet_alone_scores": _score_summary(scores.get("eval_unet_alone")),
        "train_loss": done.get("train_loss"),
        "train_seconds": done.get("train_seconds"),
        "predict_seconds": done.get("predict_seconds"),
        "ignored_fraction": done.get("ignored_fraction"),
        "low_confidence_fraction": done.get("low_confidence_fraction"),
        "resumed": resumed,
    }


def build_segmentation_task(cfg: RefineConfig, channels: int, num_classes: int,
                            tile_size: Sequence[int]) -> SegmentationTask:
    """The segmentation task of ``cfg`` (UNet, Segmenter or a head on ViT tokens, CE or clipping loss), for tiles
    of ``tile_size``.

    The ViT encoder of a ViT-encoder model (:data:`~weakseg.tasks.segmentation.VIT_ENCODER_MODELS`) is initialised from ``pretrained`` (a timm / DeiT / DINO file,
    :func:`weakseg.models.pretrained.load_pretrained`) or ``encoder_checkpoint`` (a weakseg classifier's backbone,
    :func:`weakseg.models.segmenter.load_classifier_backbone`; the encoder then takes its MLP ratio, qkv bias and
    Sentinel-1 fusion). With ``pretrained`` the encoder takes the file's MLP ratio and qkv bias
    (:func:`weakseg.models.pretrained.checkpoint_block_shape`): a DeiT has 4, weakseg's own backbones 2.
    """
    segmenter = None
    backbone = None
    vit = cfg.model in VIT_ENCODER_MODELS
    if vit:
        segmenter = {"patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
                     "num_heads": cfg.num_heads, "freeze_encoder": bool(cfg.freeze_encoder)}
        if cfg.model == "segmenter":
            segmenter["decoder_depth"] = cfg.decoder_depth
        if cfg.encoder_checkpoint:
            from weakseg.tasks.classification import load_classifier

            backbone = load_classifier(Path(cfg.encoder_checkpoint)).model
            shape = backbone.cfg
            segmenter.update(mlp_ratio=float(shape.mlp_ratio), qkv_bias=bool(shape.qkv_bias),
                             s1_chans=int(shape.s1_chans), fusion=str(shape.fusion))
        elif cfg.pretrained:  # the encoder's MLP width and qkv bias are the checkpoint's, so every block tensor loads
            from weakseg.models.pretrained import checkpoint_block_shape

            segmenter.update(checkpoint_block_shape(Path(cfg.pretrained)))
    task = SegmentationTask(
        in_chans=channels, num_classes=num_classes, widths=list(cfg.widths), lr=cfg.lr, lr_schedule=cfg.lr_schedule,
        model=cfg.model, segmenter=segmenter, tile_size=list(tile_size), loss=cfg.loss, clip_start=cfg.clip_start,
        clip_window=cfg.clip_window, optimizer=cfg.optimizer,
        encoder_lr_scale=cfg.encoder_lr_scale if vit else 1.0, window=cfg.window,
        stride=cfg.stride, scales=list(cfg.predict_scales), flip=cfg.predict_flip,
    )
    if cfg.pretrained and vit:
        from weakseg.models.pretrained import load_pretrained

        load_pretrained(task.model.encoder, Path(cfg.pretrained))
    if backbone is not None:
        from weakseg.models.segmenter import load_classifier_backbone

        loaded = load_classifier_backbone(task.model.encoder, backbone)
        log.info("%s encoder from the backbone of %s: %d tensors copied, left out %s", cfg.model,
                 cfg.encoder_checkpoint, len(loaded["copied"]), loaded["skipped"])
    return task


def _validate(cfg: RefineConfig) -> None:
    if not cfg.supervised and not cfg.pseudomasks:
        raise ConfigError(
            "refinement needs a pseudomask folder (--pseudomasks), or --supervised for the upper bound"
        )
    checks = [("iterations", cfg.iterations, 0), ("epochs", cfg.epochs, 1), ("batch_size", cfg.batch_size, 1),
              ("num_devices", cfg.num_devices, 1), ("num_nodes", cfg.num_nodes, 1),
              ("num_workers", cfg.num_workers, 0),
              ("figure_tiles", cfg.figure_tiles, 1)]
    for name, value, minimum in checks:
        if int(value) < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value} (--{name})")
    if not cfg.lr > 0:
        raise ConfigError(f"learning rate must be positive, got {cfg.lr} (--learning_rate)")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose from {list(LR_SCHEDULES)} "
                          "(--lr_schedule)")
    confidence = cfg.min_confidence
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1:
        raise ConfigError(f"min_confidence must be a number in [0, 1], got {confidence!r} (--min_confidence)")
    if cfg.classifier is not None and not Path(cfg.classifier).is_file():
        raise ConfigError(f"classifier checkpoint {cfg.classifier} does not exist (--model_checkpoint)")
    if not cfg.widths or any(int(w) <= 0 for w in cfg.widths):
        raise ConfigError(f"UNet widths must be positive integers, got {list(cfg.widths)} (--widths)")
    if cfg.normalization not in NORMALIZATION_MODES:
        raise ConfigError(
            f"unknown normalization {cfg.normalization!r}; choose from {list(NORMALIZATION_MODES)}"
        )
    if cfg.band_stats is not None and len(cfg.band_stats) != 2:
        raise ConfigError("band_stats must be [mean per band, std per band]")
    if cfg.model not in SEGMENTATION_MODELS:
        raise ConfigError(f"unknown model {cfg.model!r} (--model); choose from {list(SEGMENTATION_MODELS)}")
    if cfg.loss not in SEGMENTATION_LOSSES:
        raise ConfigError(f"unknown loss {cfg.loss!r} (--loss); choose from {list(SEGMENTATION_LOSSES)}")
    for name in ("pretrained", "encoder_checkpoint"):
        path = getattr(cfg, name)
        if path and cfg.model not in VIT_ENCODER_MODELS:
            raise ConfigError(f"--{name} initialises a ViT encoder: it needs a ViT-encoder --model "
                              f"({', '.join(VIT_ENCODER_MODELS)}), not {cfg.model}")
        if path and not Path(path).is_file():
            raise ConfigError(f"{name} checkpoint {path} does not exist (--{name})")
    if cfg.freeze_encoder and cfg.model not in VIT_ENCODER_MODELS:
        raise ConfigError(f"--freeze_encoder freezes the ViT encoder of a ViT-encoder --model "
                          f"({', '.join(VIT_ENCODER_MODELS)}); --model {cfg.model} has none")
    if cfg.pretrained and cfg.encoder_checkpoint:
        raise ConfigError("--pretrained and --encoder_checkpoint both initialise the encoder: give one")
    if cfg.window is not None and cfg.stride is not None and cfg.stride > cfg.window:
        raise ConfigError(f"--stride {cfg.stride} is larger than --window {cfg.window}: pixels between the windows "
                          "would get no prediction")
    if cfg.model in VIT_ENCODER_MODELS and cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"--embed_dim {cfg.embed_dim} is not divisible by --num_heads {cfg.num_heads}")
    if cfg.model == "setr_pup":
        from weakseg.models.seg_heads import pup_stages

        pup_stages(cfg.patch_size)  # a power of two, before any data is read


def refine(cfg: RefineConfig, verbose: bool = True) -> dict[str, Any]:
    """Run refinement iterations (or, with ``cfg.supervised``, the fully supervised upper bound).

    With ``verbose`` (the command) one progress line per stage and the final tables are printed; a caller that
    reports on its own (the demo) passes False.

    Returns:
        The summary, also written to ``output_dir/summary.json`` (merged with the other mode's results when
        the same folder holds both): ``output_dir``, ``split``, ``eval_split``, ``has_ground_truth``,
        ``eval_has_ground_truth``, ``eval_tiles_in_training`` (tiles of ``eval_split`` that are training tiles:
        0 for a held-out split, warned about otherwise), ``iterations`` (one entry per iteration 0..N:
        ``iteration``, ``masks``, ``eval_masks``, ``train_scores`` and ``eval_scores`` as ``{miou, oa, aa, coverage}`` or None,
        ``train_loss``, ``train_seconds``, ``predict_seconds``, ``ignored_fraction`` (share of the target
        pixels the loss ignored: unlabelled or below ``min_confidence``; None for iteration 0),
        ``low_confidence_fraction`` (the part below ``min_confidence``), ``resumed``), ``final_masks`` (the
        last iteration's masks: the refined pseudomasks) and ``supervised`` (an entry of the same form, or
        None).

    Raises:
        DataError: missing or incomplete pseudomask folder, mask sizes or values that do not fit the tiles, a
            ``confidence/`` folder that lacks some tiles.
        ConfigError: invalid settings, tiles of different sizes in a split, no ground truth for
            ``supervised``, a finished stage in ``output_dir`` made with other settings.
    """
    _validate(cfg)
    cfg = dataclasses.replace(cfg, widths=[int(w) for w in cfg.widths],
                              min_confidence=float(cfg.min_confidence))
    with ExitStack() as stack:
        if process_rank() == 0:  # one run per output folder (the other DDP ranks follow rank 0)
            make_dir(Path(cfg.output_dir), "output folder (--output)")
            stack.enter_context(folder_lock(Path(cfg.output_dir), "weakseg refine"))
        return _refine(cfg, verbose)


def _refine(cfg: RefineConfig, verbose: bool) -> dict[str, Any]:
    ctx = _Context(cfg)
    out = ctx.out
    if cfg.supervised and not ctx.has_gt:
        raise ConfigError(
            f"split {cfg.split!r} of {cfg.datadir} has no ground-truth masks: the supervised upper bound "
            "needs them"
        )
    if cfg.supervised:
        reader = ctx.train_reader
        targets = TargetMasks.from_reader(reader)  # read per tile, never held for the whole split
    else:
        targets = ctx.load_targets(Path(str(cfg.pseudomasks)))
    # Refuse a folder of other settings before writing anything into it.
    if cfg.supervised:
        check_reusable(out / SUPERVISED_DIR, ctx.fingerprint(supervised=True))
    else:
        for i in range(1, cfg.iterations + 1):
            if check_reusable(iteration_dir(out, i), ctx.fingerprint(supervised=False)) is None:
                break
    if _is_rank_zero():
        save_resolved(cfg, out, name="config_supervised.yaml" if cfg.supervised else "config.yaml",
                      band_stats=ctx.band_stats)
    previous = read_json(out / SUMMARY_FILE) or {}
    if previous.get("split") != cfg.split:
        previous = {}
    summary: dict[str, Any] = {
        "output_dir": str(out), "split": cfg.split, "eval_split": cfg.eval_split,
        "has_ground_truth": ctx.has_gt, "eval_has_ground_truth": ctx.eval_has_gt,
        "eval_tiles_in_training": ctx.eval_overlap,
        "iterations": previous.get("iterations", []), "final_masks": previous.get("final_masks"),
        "supervised": previous.get("supervised"),
    }
    tiles = len(ctx.train_reader.ids)
    train_tables: dict[str, dict[str, Any]] = {}  # stage -> full scores, for the per-class tables
    eval_tables: dict[str, dict[str, Any]] = {}

    def report(name: str, key: str, entry: dict[str, Any], scores: dict[str, Any] | None) -> None:
        if verbose and _is_rank_zero():
            print(refine_progress_line(name, entry, cfg.eval_split, cfg.epochs, tiles), flush=True)
        if scores and scores.get("train_tiles"):
            train_tables[key] = scores["train_tiles"]
        if scores and scores.get("eval_split"):
            eval_tables[key] = scores["eval_split"]

    if cfg.supervised:
        stage_dir = out / SUPERVISED_DIR
        done = _finished(ctx, stage_dir, supervised=True)
        resumed = done is not None
        if done is None:
            done = _train_stage(ctx, stage_dir, cfg.seed + 1, targets, "supervised", supervised=True)
        scores = read_json(stage_dir / SCORES_FILE)
        summary["supervised"] = _entry("supervised", stage_dir / "masks", stage_dir / "eval_masks", scores,
                                       done, resumed)
        report("supervised", "supervised", summary["supervised"], scores)
    else:
        iter0 = iteration_dir(out, 0)
        iter0.mkdir(parents=True, exist_ok=True)
        pseudomasks = Path(str(cfg.pseudomasks))
        # Masks of tiles outside the split may sit in the input folder (load_mask_folder ignores them too).
        train0 = evaluate_folder(pseudomasks, ctx.train_reader, allow_extra=True) if ctx.has_gt else None
        scores0 = {"train_tiles": train0, "eval_split": None}
        if _is_rank_zero():
            atomic_write_json(iter0 / SCORES_FILE, scores0)
        entries = [_entry(0, pseudomasks, None, scores0, None, resumed=False)]
        report(f"iteration 0/{cfg.iterations}", "iter0", entries[0], scores0)
        redo = False  # once a stage is retrained, every later one depends on new masks
        for i in range(1, cfg.iterations + 1):
            stage_dir = iteration_dir(out, i)
            done = None if redo else _finished(ctx, stage_dir, supervised=False)
            resumed = done is not None
            if done is None:
                redo = True
                if _is_rank_zero():
                    invalidate_later_iterations(out, i)
                if i > 1:  # the previous UNet's predictions, filtered by their confidence like iteration 1's
                    targets = ctx.load_targets(iteration_dir(out, i - 1) / "masks")
                done = _train_stage(ctx, stage_dir, cfg.seed + i, targets, f"iter{i}", supervised=False)
            scores = read_json(stage_dir / SCORES_FILE)
            entries.append(_entry(i, stage_dir / "masks", stage_dir / "eval_masks", scores, done, resumed))
            report(f"iteration {i}/{cfg.iterations}", f"iter{i}", entries[-1], scores)
        summary["iterations"] = entries
        summary["final_masks"] = entries[-1]["masks"]
    if _is_rank_zero():
        summary["figures"] = write_refine_figures(out, summary, ctx.train_reader, cfg.figure_tiles, cfg.figures)
        atomic_write_json(out / SUMMARY_FILE, summary)
    if verbose and _is_rank_zero():
        print()
        print(format_refine_table(summary))
        for title, table in ((f"training tiles of {cfg.split!r}", train_tables),
                             (f"eval split {cfg.eval_split!r}", eval_tables)):
            if table:
                print(f"\nper-class scores on the {title}")
                print(format_scores_table(table))
        if ctx.eval_overlap:
            print(f"\nwarning: {ctx.overlap_message()}")
    return summary
