"""Train a teacher on a labelled ImageFolder (``kd3 teacher train``); writes the checkpoint contract."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pipeline.core.checkpoint import save_checkpoint
from pipeline.core.errors import DataError

from .data import IMAGE_EXTS, LabelledFolder, build_transforms, decode
from .models import count_params, create_model

log = logging.getLogger("kd3.teacher")


def _folder_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"--data {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"--data {root}: need at least two class sub-folders, found {classes}")
    return classes


def channel_stats(paths: list[Path], size: int, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the (resized) training images, on up to ``limit`` images."""
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
                  lr: float = 0.05, val_dir: Path | None = None, device: str = "auto", seed: int = 0,
                  augment: str = "rrc_flip") -> dict:
    """Supervised training (SGD, cosine lr); ``augment`` as distill's (rrc_flip: RandomResizedCrop with
    scale 0.5-1 + flip; crop: pad + random crop, no flip; flip; none); returns a summary."""
    torch.manual_seed(seed)
    data = Path(data)
    classes = _folder_classes(data)
    paths = [f for c in classes for f in sorted((data / c).rglob("*"))
             if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTS]
    if not paths:
        raise DataError(f"--data {data}: no images found")
    mean, std = channel_stats(paths, img_size)
    train_t = build_transforms(img_size, mean, std, augment, train=True, rrc_scale=(0.5, 1.0))
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
    summary = {"arch": arch, "augment": augment, "classes": classes, "train_images": len(ds),
               "train_acc": correct / max(1, n),
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
