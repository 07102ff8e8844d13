"""Device-side JPEG decoding (datamodules.jpeg_batches) against the CPU-worker path of CelebADataModule.

The reference is the worker path (PIL decode + per-image warp): device-decode batches must hold the same
crops to within JPEG-decoder tolerance, and the same labels, landmarks and indices.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_celeba import ALIGNED_SIZE, EYE_COLOUR, WILD_SIZE, celeba_records, write_celeba  # noqa: E402

from datamodules.celeba import CelebADataModule  # noqa: E402
from datamodules.jpeg_batches import (  # noqa: E402
    JPEG_KEY,
    NAME_KEY,
    collate_jpeg,
    decode_batch,
    decode_jpegs,
    jpeg_to_canvas,
    read_jpeg,
)
from datamodules.transforms import AffactAugmentConfig  # noqa: E402

# libjpeg builds may differ in IDCT / chroma upsampling by a few levels on edges; nvjpeg likewise.
PIXEL_ATOL = 6 / 255
PIXEL_MEAN_ATOL = 0.5 / 255


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory) -> Path:
    return write_celeba(tmp_path_factory.mktemp("celeba"), layout="txt", n=12, wild=True)


def _pil(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _datamodule(root: Path, decode_on_device: bool, images: str = "aligned", **kw) -> CelebADataModule:
    dm = CelebADataModule(str(root), image_size=48, batch_size=6, num_workers=0, images=images,
                          decode_on_device=decode_on_device, seed=3, **kw)
    dm.setup()
    return dm


def test_read_jpeg_bytes_and_errors(celeba_root, tmp_path):
    path = celeba_root / "img_align_celeba" / "000001.jpg"
    data = read_jpeg(path)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert data.numpy().tobytes() == path.read_bytes()
    png = tmp_path / "fake.jpg"
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(OSError, match=r"fake\.jpg: not a JPEG file"):
        read_jpeg(png)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match=r"empty\.jpg: not a JPEG"):
        read_jpeg(empty)


def test_batched_decode_matches_pil(celeba_root):
    paths = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))[:4] + \
        sorted((celeba_root / "img_celeba").glob("*.jpg"))[:2]
    decoded = decode_jpegs([read_jpeg(p) for p in paths], "cpu")
    assert len(decoded) == 6
    for p, img in zip(paths, decoded):
        ref = _pil(p)
        assert img.shape == ref.shape and img.dtype == torch.uint8
        diff = (img.int() - ref.int()).abs().float() / 255
        assert diff.max() <= PIXEL_ATOL and diff.mean() <= PIXEL_MEAN_ATOL
    assert decoded[0].shape[1:] == (ALIGNED_SIZE[1], ALIGNED_SIZE[0])
    assert decoded[-1].shape[1:] == (WILD_SIZE[1], WILD_SIZE[0])


def test_corrupt_jpeg_in_a_batch_names_the_file(celeba_root, tmp_path):
    good = read_jpeg(celeba_root / "img_align_celeba" / "000001.jpg")
    bad = torch.cat([good[:2], torch.full((200,), 7, dtype=torch.uint8)])  # SOI then garbage
    with pytest.raises(OSError, match=r"broken\.jpg: cannot decode JPEG"):
        decode_jpegs([good, bad], "cpu", names=["ok.jpg", "broken.jpg"])


def test_canvas_of_mixed_sizes_puts_the_eyes_on_the_landmarks(celeba_root):
    """Aligned and in-the-wild images in one batch: each size group warped, eye dots land on the landmarks."""
    rec = celeba_records(n=12)
    paths = [celeba_root / "img_align_celeba" / rec.names[i] for i in (0, 1)] + \
        [celeba_root / "img_celeba" / rec.names[i] for i in (2, 4)]
    lm = torch.tensor(np.concatenate([rec.landmarks[[0, 1]], rec.wild_landmarks[[2, 4]]]), dtype=torch.float32)
    images = decode_jpegs([read_jpeg(p) for p in paths], "cpu")
    canvas, canvas_lm = jpeg_to_canvas(images, lm, image_size=64, canvas_size=80)
    assert canvas.shape == (4, 3, 80, 80) and canvas.dtype == torch.float32
    assert 0 <= float(canvas.min()) and float(canvas.max()) <= 1
    eye = torch.tensor(EYE_COLOUR, dtype=torch.float32) / 255
    for b in range(4):
        # AFFACT geometry: eyes level, eye distance = 1/5.5 of the crop box (64 px)
        left, right = canvas_lm[b, 0], canvas_lm[b, 1]
        assert abs(float(left[1] - right[1])) < 1e-3
        for k in (0, 1):
            x, y = (int(round(float(v))) for v in canvas_lm[b, k])
            assert torch.allclose(canvas[b, :, y, x], eye, atol=0.12), (b, k, canvas[b, :, y, x])
    with pytest.raises(ValueError, match="2 images but 4 landmark sets"):
        jpeg_to_canvas(images[:2], lm, 64, 80)


@pytest.mark.parametrize("images", ["aligned", "wild"])
def test_device_decode_batches_equal_worker_batches(celeba_root, images):
    """Same crops, labels, landmarks and indices from both paths, for evaluation and augmented training."""
    ref_dm, dev_dm = _datamodule(celeba_root, False, images), _datamodule(celeba_root, True, images)
    for split in ("train", "val"):
        ref_batch = next(iter(ref_dm._loader(split, False)))
        raw_batch = next(iter(dev_dm._loader(split, False)))
        assert "image" not in raw_batch and len(raw_batch[JPEG_KEY]) == len(raw_batch["index"])
        assert all(n.endswith(".jpg") for n in raw_batch[NAME_KEY])
        for train in (False, True):
            gen = [torch.Generator().manual_seed(11) for _ in range(2)]
            if train:
                ref = ref_dm.augment(ref_batch, generator=gen[0])
                dev = dev_dm.augment(decode_batch(raw_batch, dev_dm.image_size, dev_dm.load_size), generator=gen[1])
            else:
                ref = ref_dm.transform_batch(ref_batch, train=False)
                dev = dev_dm.transform_batch(raw_batch, train=False)
            assert set(dev) == set(ref)
            assert dev["image"].shape == ref["image"].shape == (len(ref_batch["index"]), 3, 48, 48)
            diff = (dev["image"] - ref["image"]).abs()
            assert float(diff.max()) <= PIXEL_ATOL and float(diff.mean()) <= PIXEL_MEAN_ATOL, (split, train)
            torch.testing.assert_close(dev["landmarks"], ref["landmarks"], atol=1e-4, rtol=0)
            for key in ("attributes", "attribute_mask", "identity", "index"):
                assert torch.equal(dev[key], ref[key]), key


def test_transfer_keeps_jpeg_bytes_on_host(celeba_root):
    dm = _datamodule(celeba_root, True)
    batch = collate_jpeg([dm.datasets["train"][i] for i in range(3)])
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert moved[JPEG_KEY] is batch[JPEG_KEY] and moved[NAME_KEY] is batch[NAME_KEY]
    assert torch.equal(moved["landmarks"], batch["landmarks"])


def test_fit_with_decode_on_device(celeba_root, tmp_path):
    """One Lightning step: on_after_batch_transfer decodes, augments and the model trains on the result."""
    from lightning_modules.attribute_module import AttributeModule

    pl.seed_everything(0)
    dm = CelebADataModule(str(celeba_root), image_size=32, batch_size=4, num_workers=0, decode_on_device=True,
                          augment=AffactAugmentConfig(), seed=0)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.update({k: (tuple(v.shape), v.dtype) for k, v in batch.items() if torch.is_tensor(v)})
            seen["keys"] = set(batch)

    model = AttributeModule(backbone="resnet18", attributes=["Male", "Smiling"], scheduler="none")
    trainer = pl.Trainer(max_steps=1, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[Spy()])
    trainer.fit(model, datamodule=dm)
    assert seen["image"] == ((4, 3, 32, 32), torch.float32)
    assert JPEG_KEY not in seen["keys"] and NAME_KEY not in seen["keys"]
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])


@pytest.mark.gpu
def test_cuda_decode_matches_cpu_decode(celeba_root):
    paths = sorted((celeba_root / "img_align_celeba").glob("*.jpg"))
    data = [read_jpeg(p) for p in paths]
    cpu = decode_jpegs(data, "cpu")
    cuda = decode_jpegs(data, "cuda")
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        diff = (a.int() - b.cpu().int()).abs().float() / 255
        assert diff.max() <= PIXEL_ATOL and diff.mean() <= PIXEL_MEAN_ATOL
    dm = _datamodule(celeba_root, True)
    raw = next(iter(dm._loader("val", False)))
    moved = dm.transfer_batch_to_device(raw, torch.device("cuda"), 0)
    out = dm.transform_batch(moved, train=False)
    ref_dm = _datamodule(celeba_root, False)
    ref = ref_dm.transform_batch(next(iter(ref_dm._loader("val", False))), train=False)
    assert out["image"].device.type == "cuda"
    assert float((out["image"].cpu() - ref["image"]).abs().max()) <= PIXEL_ATOL
