"""``kd3 teacher train`` (a teacher from a labelled ImageFolder) and ``kd3 teacher info FILE``."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.checkpoint import read_checkpoint_meta, save_checkpoint
from pipeline.errors import ConfigError, DataError

log = logging.getLogger("kd3.teacher")


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a teacher on a labelled folder <data>/<class>/*.jpg",
                       description="Train a teacher on a labelled ImageFolder; writes the kd3 checkpoint contract.")
    t.add_argument("--data", type=Path, required=True, help="ImageFolder root: one sub-folder per class")
    t.add_argument("--arch", default="cnn_small", help="architecture (registry name, timm:<name>, torchvision:<name>)")
    t.add_argument("--out", type=Path, required=True, help="output checkpoint, e.g. teacher.pt")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--img-size", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--val-dir", type=Path, help="labelled ImageFolder for validation accuracy")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-level", default="INFO")
    i = sub.add_parser("info", help="print a checkpoint's metadata (arch, classes, input size, mean/std)")
    i.add_argument("file", type=Path)
    i.add_argument("--log-level", default="INFO")


def _folder_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"--data {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"--data {root}: need at least two class sub-folders, found {classes}")
    return classes


def channel_stats(paths: list[Path], size: int, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the (resized) training images, on up to ``limit`` images."""
    from torchvision import transforms as T

    from .data import decode

    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    step = max(1, len(paths) // limit)
    for p in paths[::step]:
        x = tf(decode(Path(p).read_bytes(), str(p))).double()
        s += x.sum(dim=(1, 2))
        s2 += (x * x).sum(dim=(1, 2))
        n += x.shape[1] * x.shape[2]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-8).sqrt()
    return [float(v) for v in mean], [float(max(v, 1e-3)) for v in std]


def train_teacher(data: Path, arch: str, out: Path, *, epochs: int = 30, img_size: int = 32, batch_size: int = 128,
                  lr: float = 0.05, val_dir: Path | None = None, device: str = "auto", seed: int = 0) -> dict:
    """Supervised training (SGD, cosine lr, RandomResizedCrop(scale 0.5-1) + flip); returns a summary."""
    from torch.utils.data import DataLoader

    from .data import IMAGE_EXTS, LabelledFolder, build_transforms
    from .models import count_params, create_model

    torch.manual_seed(seed)
    data = Path(data)
    classes = _folder_classes(data)
    paths = [f for c in classes for f in sorted((data / c).rglob("*"))
             if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS]
    if not paths:
        raise DataError(f"--data {data}: no images found")
    mean, std = channel_stats(paths, img_size)
    from torchvision import transforms as T

    train_t = T.Compose([T.RandomResizedCrop(img_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                         T.ToTensor(), T.Normalize(mean, std)])
    ds = LabelledFolder(data, classes, train_t)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = create_model(arch, len(classes)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) > batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        tot = correct = n = 0
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            z = model(x)
            loss = F.cross_entropy(z, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(y)
            correct += int((z.argmax(1) == y).sum())
            n += len(y)
        log.info("teacher epoch %d/%d: loss %.4f, train acc %.4f", ep + 1, epochs, tot / n, correct / n)
    summary = {"arch": arch, "classes": classes, "train_images": len(ds), "train_acc": correct / max(1, n),
               "params": count_params(model), "time_s": time.time() - t0, "mean": mean, "std": std}
    if val_dir is not None:
        vds = LabelledFolder(val_dir, classes, build_transforms(img_size, mean, std, train=False))
        model.eval()
        c = m = 0
        with torch.no_grad():
            for x, y in DataLoader(vds, batch_size=256):
                c += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
                m += len(y)
        summary["val_acc"] = c / m
        log.info("teacher val acc %.4f on %d images", c / m, m)
    save_checkpoint(out, arch, classes, img_size, mean, std, model.state_dict())
    return summary


def teacher_cli(args) -> int:
    if args.action == "info":
        meta = read_checkpoint_meta(args.file)
        out = dict(meta)
        if not out.get("arch", "").startswith("torchscript"):
            from pipeline.checkpoint import load_checkpoint

            sd = load_checkpoint(args.file)["state_dict"]
            out["params"] = int(sum(v.numel() for k, v in sd.items() 
                                    if torch.is_tensor(v) and v.is_floating_point() and "running_" not in k))
        print(json.dumps(out, indent=2))
        return 0
    if args.action == "train":
        if args.epochs <= 0 or args.img_size <= 0 or args.batch_size <= 0 or args.lr <= 0:
            raise ConfigError("--epochs, --img-size, --batch-size and --lr must be positive")
        s = train_teacher(args.data, args.arch, args.out, epochs=args.epochs, img_size=args.img_size,
                          batch_size=args.batch_size, lr=args.lr, val_dir=args.val_dir, device=args.device,
                          seed=args.seed)
        print(f"kd3 teacher: wrote {args.out} ({s['arch']}, {len(s['classes'])} classes, {s['params']} params, "
              f"train acc {s['train_acc']:.4f}" + (f", val acc {s['val_acc']:.4f}" if "val_acc" in s else "") + ")")
        return 0
    raise ConfigError(f"unknown teacher action {args.action!r}")  # pragma: no cover
