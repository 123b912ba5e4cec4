"""``kd3 teacher train`` (a teacher from a labelled ImageFolder) and ``kd3 teacher info FILE``.

Only the arguments live here, so building the ``kd3`` parser stays free of torch; the training is in
:mod:`distill.teacher_train`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.core.checkpoint import load_checkpoint, read_checkpoint_meta
from pipeline.core.config import AUGMENTS
from pipeline.core.errors import ConfigError


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a teacher on a labelled folder <data>/<class>/*.jpg",
                       description="Train a teacher on a labelled ImageFolder; writes the kd3 checkpoint contract.")
    t.add_argument("--data", type=Path, required=True, metavar="PATH", help="ImageFolder root: one sub-folder per class")
    t.add_argument("--arch", default="cnn_small", help="architecture (registry name, timm:<name>, torchvision:<name>)")
    t.add_argument("--out", type=Path, required=True, metavar="PATH", help="output checkpoint, e.g. teacher.pt")
    t.add_argument("--epochs", type=int, default=30, metavar="N", help="training epochs (default: 30)")
    t.add_argument("--img-size", type=int, default=32, metavar="N", help="input size (default: 32)")
    t.add_argument("--batch-size", type=int, default=128, metavar="N", help="batch size (default: 128)")
    t.add_argument("--lr", type=float, default=0.05, metavar="X", help="SGD learning rate, cosine decay (default: 0.05)")
    t.add_argument("--augment", choices=AUGMENTS, default="rrc_flip",
                   help="rrc_flip: RandomResizedCrop (scale 0.5-1) + horizontal flip (default); crop: pad + random "
                        "crop, no flip (digits, text: anything not mirror-symmetric); flip; none")
    t.add_argument("--val-dir", type=Path, metavar="PATH", help="labelled ImageFolder for validation accuracy")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    t.add_argument("--log-level", default="INFO", metavar="LEVEL", help="level of kd3's own log lines")
    i = sub.add_parser("info", help="print a checkpoint's metadata (arch, classes, input size, mean/std)")
    i.add_argument("file", type=Path)
    i.add_argument("--log-level", default="INFO", metavar="LEVEL", help="level of kd3's own log lines")


def teacher_cli(args) -> int:
    if args.action == "info":
        meta = read_checkpoint_meta(args.file)
        out = dict(meta)
        if not out.get("arch", "").startswith("torchscript"):
            import torch  # heavy: only for `kd3 teacher info`

            sd = load_checkpoint(args.file)["state_dict"]
            out["params"] = int(sum(v.numel() for k, v in sd.items()
                                    if torch.is_tensor(v) and v.is_floating_point() and "running_" not in k))
        print(json.dumps(out, indent=2))
        return 0
    if args.action == "train":
        if args.epochs <= 0 or args.img_size <= 0 or args.batch_size <= 0 or args.lr <= 0:
            raise ConfigError("--epochs, --img-size, --batch-size and --lr must be positive")
        from .teacher_train import train_teacher  # heavy (torch): only for `kd3 teacher train`

        s = train_teacher(args.data, args.arch, args.out, epochs=args.epochs, img_size=args.img_size,
                          batch_size=args.batch_size, lr=args.lr, val_dir=args.val_dir, device=args.device,
                          seed=args.seed, augment=args.augment)
        print(f"kd3 teacher: wrote {args.out} ({s['arch']}, {len(s['classes'])} classes, {s['params']} params, "
              f"train acc {s['train_acc']:.4f}" + (f", val acc {s['val_acc']:.4f}" if "val_acc" in s else "") + ")")
        return 0
    raise ConfigError(f"unknown teacher action {args.action!r}")  # pragma: no cover
