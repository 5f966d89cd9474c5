"""The ``weakseg`` sub-commands: one module per command, each with ``add_parser(subparsers)``.

:data:`COMMANDS` lists them with their one-line help, here rather than only in each module, so that
``weakseg --help`` and ``weakseg <command>`` import only the command that runs: building every command's parser
imported torch, Lightning and every method (about 5 s idle, most of a minute on a busy machine) before a light
command such as ``weakseg evaluate`` could start.
"""

#: command name -> (module in this package, one-line help), in the order ``weakseg --help`` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on built-in synthetic data (about 5 min on CPU)"),
    "make-data": ("make_data", "write the built-in synthetic Sentinel-1/2 land-cover dataset (DFC2020 layout)"),
    "prepare": ("prepare", "write a split's tiles once into a memory-mapped tile store that every run then reads"),
    "train": ("train", "train the (gated) ViT on image-level labels"),
    "pseudomasks": ("pseudomasks", "generate pseudomasks from a trained classifier"),
    "evaluate": ("evaluate", "score prediction folders against ground-truth masks (OA, AA, mIoU, per-class IoU)"),
    "refine": ("refine", "refine pseudomasks with a UNet (or train the fully supervised upper bound)"),
    "pretrain": ("pretrain", "self-supervised Barlow Twins pretraining of the ViT on unlabelled tiles"),
    "attention": ("attention", "per-head attention maps of a checkpoint (60 % mass outlines, pruned heads) as PNGs"),
    "erf": ("erf", "effective receptive fields of a ViT or UNet checkpoint over depth, as one PNG"),
}


def command_help(name: str) -> str:
    """The one-line help of command ``name``."""
    return COMMANDS[name][1]
