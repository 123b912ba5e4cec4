"""The CPU speed-ups of issue 14 change no result: the teacher embedder's batched preprocess (PIL steps per
image, ToTensor + Normalize once per batch) gives the per-image tensors bit for bit."""
import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)


def test_teacher_embedder_collate_equals_stacked_preprocess(digits_world):
    from distill.embedder import TeacherEmbedder

    emb = TeacherEmbedder(digits_world["teacher"], "cpu", ["0", "1", "2", "3"])
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((16, 16), (40, 23), (300, 200), (7, 90))]
    prepared = [emb.prepare(im) for im in imgs]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in prepared)  # no torch op per image
    batch = emb.collate(prepared)
    want = torch.stack([emb.preprocess(im) for im in imgs])
    assert batch.dtype == want.dtype and torch.equal(batch, want)
    assert np.array_equal(emb.embed(batch)[0], emb.embed(want)[0])
