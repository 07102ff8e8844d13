"""One table of damaged or wrong inputs, each fed to the real entry point: every case must fail with a message
naming the file and line, or the option, that is wrong (CelebA files are scanned in full before training)."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures_celeba import edit_line, write_celeba

ROOT = Path(__file__).resolve().parent.parent
N = 12


def celeba(tmp_path, layout="txt"):
    return write_celeba(tmp_path, layout=layout, n=N)


def scan(root):
    from datamodules.celeba import scan_celeba
    return lambda: scan_celeba(root)


def image(root, name):
    return root / "img_align_celeba" / name


def truncated_jpeg(tmp_path):
    from datamodules.celeba import CelebADataModule
    root = celeba(tmp_path)
    data = image(root, "000002.jpg").read_bytes()
    image(root, "000002.jpg").write_bytes(data[: len(data) // 2])  # header intact: the scan passes, loading fails
    dm = CelebADataModule(str(root), image_size=64, batch_size=4, num_workers=0, seed=0)
    dm.setup("fit")
    return lambda: dm.datasets["train"][1]


def missing_image(tmp_path):
    root = celeba(tmp_path)
    image(root, "000004.jpg").unlink()
    return scan(root)


def zero_byte_image(tmp_path):
    root = celeba(tmp_path)
    image(root, "000005.jpg").write_bytes(b"")
    return scan(root)


def non_image_file(tmp_path):
    root = celeba(tmp_path)
    image(root, "000002.jpg").write_text("name,value\nnot,an image\n")
    return scan(root)


def edited(name, line, change, layout="txt"):
    def build(tmp_path):
        root = celeba(tmp_path, layout)
        edit_line(root / name, line, change)
        return scan(root)
    return build


def attribute_value(value):
    def change(line):
        tokens = line.split()
        tokens[6] = value
        return " ".join(tokens)
    return change


def empty_split(tmp_path):
    root = celeba(tmp_path)
    for line in range(10, 13):  # the three test images become validation images
        edit_line(root / "list_eval_partition.txt", line, lambda s: s[:-1] + "1")
    return scan(root)


def unknown_attribute(tmp_path):
    from lightning_modules.attribute_module import AttributeModule
    return lambda: AttributeModule(backbone="resnet18", attributes=["Eyeglasses", "Glasses"])


def unknown_layer(tmp_path):
    from analysis.layers import resolve_layer
    from lightning_modules.attribute_module import AttributeModule
    model = AttributeModule(backbone="resnet18", attributes=["Eyeglasses"])
    return lambda: resolve_layer(model, "layer9")


def bias_rate_out_of_range(tmp_path):
    from datamodules.biased import select_biased
    male = np.arange(40) % 2 == 0
    return lambda: select_biased(male, np.arange(40) % 3 == 0, p=120, kind="eyeglasses")


def config_type_error(tmp_path):
    import train
    os.chdir(ROOT)
    return lambda: train.main(["fit", "--config", "configs/quickstart.yaml", "--trainer.logger", "false",
                               "--trainer.default_root_dir", str(tmp_path), "--model.init_args.lr", "abc"])


# (case, build(tmp_path) -> call that must fail, exception, pattern the message must match)
CASES = [
    ("truncated_jpeg", truncated_jpeg, OSError, r"000002\.jpg"),
    ("missing_image", missing_image, "CelebAFormatError", r"list_attr_celeba\.txt:6:.*000004\.jpg.*not found"),
    ("zero_byte_file", zero_byte_image, "CelebAFormatError", r"list_attr_celeba\.txt:7:.*empty \(0 bytes\)"),
    ("non_image_file", non_image_file, "CelebAFormatError", r"000002\.jpg.*cannot read image header"),
    ("attribute_column_count", edited("list_attr_celeba.txt", 5, lambda s: s.rsplit(" ", 1)[0]),
     "CelebAFormatError", r"list_attr_celeba\.txt:5:.*expected 41 columns"),
    ("attribute_value_not_pm1", edited("list_attr_celeba.txt", 3, attribute_value("0")),
     "CelebAFormatError", r"list_attr_celeba\.txt:3:.*-1 or 1"),
    ("duplicated_image_name", edited("list_landmarks_align_celeba.txt", 4, lambda s: "000001.jpg" + s[10:]),
     "CelebAFormatError", r"list_landmarks_align_celeba\.txt:4:.*duplicated image"),
    ("landmark_outside_image", edited("list_landmarks_align_celeba.txt", 5, lambda s: s[:10] + "   500" + s[16:]),
     "CelebAFormatError", r"list_landmarks_align_celeba\.txt:5:.*outside the 178x218"),
    ("nan_landmark", edited("list_landmarks_align_celeba.csv", 5, lambda s: s.rsplit(",", 1)[0] + ",nan", "csv"),
     "CelebAFormatError", r"list_landmarks_align_celeba\.csv:5:.*not a finite"),
    ("empty_split", empty_split, "CelebAFormatError", r"list_eval_partition\.txt: split 'test' \(partition 2\) has no"),
    ("unknown_attribute", unknown_attribute, ValueError, r"attributes.*unknown attribute.*'Glasses'"),
    ("unknown_layer", unknown_layer, ValueError, r"unknown layer 'layer9'.*Valid layers"),
    ("bias_rate_out_of_range", bias_rate_out_of_range, ValueError, r"data\.p: bias rate P .*50\.\.100, got 120"),
    ("config_type_error", config_type_error, SystemExit, r"model\.init_args\.lr|lr.*abc"),
]


@pytest.mark.parametrize("build,error,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_naming_the_culprit(tmp_path, monkeypatch, capsys, build, error, pattern):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    if error == "CelebAFormatError":
        from datamodules.celeba import CelebAFormatError as error
    call = build(tmp_path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value) + "\n".join(str(p) for p in getattr(info.value, "problems", [])) + capsys.readouterr().err
    assert re.search(pattern, message, re.S), message[-2000:]


def test_every_issue_case_is_in_the_table():
    listed = {"truncated_jpeg", "missing_image", "zero_byte_file", "non_image_file", "attribute_column_count",
              "attribute_value_not_pm1", "duplicated_image_name", "landmark_outside_image", "nan_landmark",
              "empty_split", "unknown_attribute", "unknown_layer", "bias_rate_out_of_range", "config_type_error"}
    assert listed == {c[0] for c in CASES}
