"""Data: the embedded synthetic set (deterministic, 3D-consistent, cached), the real-folder
loader (every bad input named), and the endless, resumable loader."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from grafccsr.config import CameraConfig, DataConfig, MemoryConfig, SyntheticConfig
from grafccsr.config.schema import HoldoutConfig
from grafccsr.data.holdout import held_out_mask
from grafccsr.paths import PROJECT_ROOT
from grafccsr.data import DatasetError, InfiniteSampler, MultiViewFolder, build_dataset, build_loader, build_synthetic
from grafccsr.data import synthetic
from grafccsr.cli.data import main as cli_main


CAM = CameraConfig()


def small_cfg(root: Path | None = None, **synthetic_overrides) -> DataConfig:
    syn = {"num_azimuths": 8, **synthetic_overrides}
    return DataConfig(image_size=32, root=str(root) if root else None, synthetic=SyntheticConfig(**syn))


def file_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory) -> MultiViewFolder:
    """Every recipe once (5 classes x 4 elevations x 8 azimuths, 32 px)."""
    cfg = small_cfg(num_classes=5)
    return MultiViewFolder(build_synthetic(cfg, CAM, tmp_path_factory.mktemp("five")), cfg)


# --------------------------------------------------------------------------- synthetic set


def test_build_is_deterministic(tmp_path):
    cfg = small_cfg()
    first = file_hashes(build_synthetic(cfg, CAM, tmp_path / "a"))
    second = file_hashes(build_synthetic(cfg, CAM, tmp_path / "b"))
    assert len(first) == 2 * 4 * 8 + 1  # images + manifest
    assert first == second


def test_round_trip_labels_and_poses_match_file_names(five_classes):
    cfg = small_cfg(num_classes=5)
    ds = five_classes
    assert len(ds) == 5 * 4 * 8 and ds.images.shape == (160, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.class_names == sorted(ds.class_names) and ds.class_names[0] == "class0_column"
    for path, (cls, elev, deg), (u, v) in zip(ds.files, ds.labels.tolist(), ds.poses.tolist()):
        prefix, azimuth = path.stem.rsplit("_", 1)
        assert path.parent.name == ds.class_names[cls]
        assert prefix == cfg.elevation_prefixes[elev] and int(azimuth) == deg and len(azimuth) == 4
        assert u == pytest.approx(deg / 360) and v == pytest.approx(cfg.elevation_v[elev])
    assert sorted(set(ds.labels[:, 2].tolist())) == list(range(0, 360, 45))
    item = ds[7]
    assert item["image"].dtype == torch.float32 and -1.0 <= item["image"].min() <= item["image"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].shape == (3,)
    assert item["pose"].dtype == torch.float32 and item["pose"].shape == (2,)


def test_objects_visible_and_not_clipped(five_classes):
    images = five_classes.images
    foreground = images.amax(1) > 0  # (N, H, W)
    assert (foreground.float().mean((1, 2)) > 0.05).all(), "every view shows the object"
    border = torch.cat((foreground[:, 0], foreground[:, -1], foreground[:, :, 0], foreground[:, :, -1]), 1)
    assert not border.any(), "the background surrounds every object"


def test_classes_differ_in_colour_and_shape(five_classes):
    ds = five_classes
    per_class = ds.images.float().view(5, 32, 3, 32, 32) / 255  # same pose order in every class
    masks = per_class.amax(2) > 0.02
    mean_colour = [per_class[c].permute(1, 0, 2, 3)[:, masks[c]].mean(1) for c in range(5)]
    assert (mean_colour[0] - mean_colour[1]).norm() > 0.2
    for a, b in itertools.combinations(range(5), 2):
        assert (mean_colour[a] - mean_colour[b]).norm() > 0.05, (a, b)
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b, float(iou))


def test_views_depend_on_azimuth(five_classes):
    """Light and texture are fixed to the object, so turning the camera changes the image."""
    views = five_classes.images.float().view(5, 4, 8, 3, 32, 32)
    change = (views - views.roll(1, dims=2)).abs().mean((3, 4, 5))
    assert (change > 1.0).all()


def test_complete_build_is_reused_and_damaged_one_rebuilt(tmp_path, monkeypatch):
    cfg = small_cfg(num_azimuths=4)
    root = build_synthetic(cfg, CAM, tmp_path / "set")
    reference = file_hashes(root)

    def must_not_render(*args, **kwargs):
        raise AssertionError("re-rendered a complete set")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "render_views", must_not_render)
        assert build_synthetic(cfg, CAM, root) == root
    (root / "class1_block" / "1_0090.png").unlink()
    build_synthetic(cfg, CAM, root)
    assert file_hashes(root) == reference
    assert not list(tmp_path.glob(".*partial*")), "staging folder left behind"


def test_interrupted_build_leaves_no_set_behind(tmp_path, monkeypatch):
    cfg = small_cfg(num_azimuths=4)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "render_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_synthetic(cfg, CAM, tmp_path / "set")
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        build_synthetic(small_cfg(num_azimuths=4), CAM, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_fingerprint_names_default_root_and_tracks_byte_changing_settings():
    base = small_cfg()
    assert synthetic.synthetic_root(base, CAM) == PROJECT_ROOT / "data" / f"synthetic-{synthetic.fingerprint(base, CAM)}"
    changed = [small_cfg(seed=1), small_cfg(supersample=3), small_cfg(num_classes=3), DataConfig(image_size=16)]
    assert len({synthetic.fingerprint(c, CAM) for c in [base, *changed]} | {synthetic.fingerprint(base, CameraConfig(fov_deg=30.0))}) == 6
    same_bytes = DataConfig(image_size=32, resize="resize", synthetic=base.synthetic)
    assert synthetic.fingerprint(same_bytes, CAM) == synthetic.fingerprint(base, CAM)


# --------------------------------------------------------------------------- folder loader


def write_image(path: Path, size=(8, 8), mode="RGB", colour=(200, 100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = colour[0] if mode in ("L", "I;16") else colour + (255,) * (len(mode) - 3)
    Image.new(mode, size, value).save(path)
    return path


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(kind="folder", root=str(root), image_size=8, **kw)


def test_loader_reads_real_naming(tmp_path):
    write_image(tmp_path / "specA" / "0_0090.jpg")
    write_image(tmp_path / "specA" / "0.5_0090.PNG", mode="RGBA")
    write_image(tmp_path / "specA" / "1_0000.png", mode="L")
    write_image(tmp_path / "specA" / "1.5_0359.png", mode="I;16", colour=(40000,))
    write_image(tmp_path / "specB" / "0_0007.webp")
    for ignored in (".DS_Store", "manifest.json", "notes.txt"):
        (tmp_path / "specA" / ignored).write_text("x")
    (tmp_path / "manifest.json").write_text("{}")
    ds = build_dataset(folder_cfg(tmp_path), CAM)
    assert ds.class_names == ["specA", "specB"] and ds.num_classes == 2
    assert ds.labels.tolist() == [[0, 0, 90], [0, 1, 90], [0, 2, 0], [0, 3, 359], [1, 0, 7]]
    assert ds.poses[1].tolist() == pytest.approx([0.25, 0.4])
    assert ds.images.shape == (5, 3, 8, 8)
    assert ds.images[2].unique().tolist() == [200]  # grey -> RGB
    assert ds.images[3].unique().tolist() == [40000 >> 8]  # 16-bit grey rescaled, not clipped


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("foo.png", None, ["foo.png", "elevPrefix", "'0.5'"]),
        ("0_12a.png", None, ["0_12a.png", "cannot parse"]),
        ("2_0090.png", None, ["2_0090.png", "'2'", "data.elevation_prefixes"]),
        ("0_0360.png", None, ["0_0360.png", "[0, 360)"]),
        ("0_0000.png", b"definitely not a png", ["0_0000.png", "cannot read"]),
        ("0_0001.png", "truncated", ["0_0001.png", "cannot read"]),
        ("0_0002.png", (10, 10), ["0_0002.png", "10x10", "data.resize=resize"]),
    ],
    ids=["unparseable", "non-numeric-azimuth", "unknown-prefix", "azimuth-360", "corrupt", "truncated", "wrong-size"],
)
def test_loader_errors_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / "spec" / name
    if isinstance(content, bytes):
        path.parent.mkdir()
        path.write_bytes(content)
    elif content == "truncated":
        write_image(path, size=(64, 64))
        path.write_bytes(path.read_bytes()[:60])
    else:
        write_image(path, size=content or (8, 8))
    with pytest.raises(DatasetError) as err:
        MultiViewFolder(tmp_path, folder_cfg(tmp_path))
    for text in expected:
        assert text in str(err.value)


def test_resize_policy(tmp_path):
    write_image(tmp_path / "spec" / "0_0000.png", size=(32, 32), colour=(10, 20, 30))
    ds = MultiViewFolder(tmp_path, folder_cfg(tmp_path, resize="resize"))
    assert ds.images.shape == (1, 3, 8, 8)
    assert ds.images[0, :, 4, 4].tolist() == [10, 20, 30]
    write_image(tmp_path / "spec" / "0_0001.png", size=(32, 16))
    with pytest.raises(DatasetError, match="0_0001.png.*not square"):
        MultiViewFolder(tmp_path, folder_cfg(tmp_path, resize="resize"))


def test_folder_structure_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        MultiViewFolder(tmp_path / "nowhere", folder_cfg(tmp_path))
    write_image(tmp_path / "0_0000.png")
    with pytest.raises(DatasetError, match="no class sub-folders.*folder above"):
        MultiViewFolder(tmp_path, folder_cfg(tmp_path))
    write_image(tmp_path / "full" / "0_0000.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("x")
    with pytest.raises(DatasetError, match=r"empty holds no images"):
        MultiViewFolder(tmp_path, folder_cfg(tmp_path))
    (tmp_path / "empty" / ".DS_Store").unlink()
    (tmp_path / "empty").rmdir()
    write_image(tmp_path / "full" / "0_90.jpg")
    write_image(tmp_path / "full" / "0_0090.png")
    with pytest.raises(DatasetError, match="same pose"):
        MultiViewFolder(tmp_path, folder_cfg(tmp_path))


# --------------------------------------------------------------------------- sampling and loading


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_infinite_sampler_resumes_the_exact_sequence():
    stream = take(InfiniteSampler(7, seed=3), 40)
    for epoch in range(5):
        assert sorted(stream[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14], "a fresh permutation each epoch"
    for start in (0, 5, 7, 23):
        assert take(InfiniteSampler(7, seed=3, start=start), 40 - start) == stream[start:]
    assert take(InfiniteSampler(7, seed=4), 40) != stream


def test_loader_resumes_batches_and_leaves_global_rng_alone(five_classes):
    memory = MemoryConfig(loader_workers=0)
    full = take(build_loader(five_classes, 6, memory, torch.device("cpu"), seed=1), 40)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    resumed = take(build_loader(five_classes, 6, memory, torch.device("cpu"), seed=1, start_batch=25), 15)
    assert torch.equal(torch.rand(1), expected)
    for a, b in zip(full[25:], resumed):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
    assert full[0]["image"].shape == (6, 3, 32, 32) and full[0]["pose"].shape == (6, 2)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_settings_follow_memory_config(five_classes):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain = build_loader(five_classes, 4, MemoryConfig(loader_workers=0, pin_memory=True), cpu, seed=0)
    assert (plain.num_workers, plain.pin_memory, plain.persistent_workers, plain.drop_last) == (0, False, False, True)
    assert plain.prefetch_factor is None
    assert build_loader(five_classes, 4, MemoryConfig(pin_memory=True), cuda, seed=0).pin_memory
    assert not build_loader(five_classes, 4, MemoryConfig(pin_memory=False), cuda, seed=0).pin_memory
    memory = MemoryConfig(loader_workers=9, prefetch_factor=3, persistent_workers=True)
    workers = build_loader(five_classes, 4, memory, cpu, seed=0)
    assert (workers.num_workers, workers.prefetch_factor, workers.persistent_workers) == (4, 3, True)
    two = build_loader(five_classes, 4, MemoryConfig(loader_workers=2), cpu, seed=0)
    batches = take(two, 3)
    assert [b["label"].tolist() for b in batches] == [b["label"].tolist() for b in take(plain, 3)]


# --------------------------------------------------------------------------- held-out views


def with_holdout(cfg: DataConfig, **holdout) -> DataConfig:
    return dataclasses.replace(cfg, holdout=HoldoutConfig(**holdout))


def test_holdout_selects_azimuth_steps_sectors_and_elevations(five_classes):
    labels = five_classes.labels  # 8 azimuths, 45 degrees apart, 4 elevations, 5 classes

    def held(**holdout):
        mask = held_out_mask(labels, HoldoutConfig(**holdout))
        return sorted(set(labels[mask, 2].tolist())), sorted(set(labels[mask, 1].tolist())), int(mask.sum())

    assert held(every_k_azimuth=8) == ([0], [0, 1, 2, 3], 5 * 4)  # the default: every 8th azimuth step
    assert held(every_k_azimuth=4, azimuth_offset=1) == ([45, 225], [0, 1, 2, 3], 5 * 4 * 2)
    assert held(every_k_azimuth=0, azimuth_ranges=["90-180"]) == ([90, 135], [0, 1, 2, 3], 5 * 4 * 2)  # [low, high)
    assert held(every_k_azimuth=0, azimuth_ranges=["300-10"]) == ([0, 315], [0, 1, 2, 3], 5 * 4 * 2)  # through 0
    assert held(every_k_azimuth=4, azimuth_ranges=["90-100"], elevations=[1, 3]) == ([0, 90, 180], [1, 3], 5 * 2 * 3)
    assert held(every_k_azimuth=0) == ([], [], 0)
    record = five_classes.holdout_record
    assert record == {"views": 20, "train_views": 140, "azimuths_deg": {p: [0] for p in ("0", "0.5", "1", "1.5")}}


def test_the_loader_never_draws_a_held_out_view(five_classes):
    cfg = with_holdout(small_cfg(num_classes=5), every_k_azimuth=4, azimuth_offset=1)
    dataset = MultiViewFolder(five_classes.root, cfg)
    seen = {tuple(label) for batch in take(build_loader(dataset, 8, MemoryConfig(loader_workers=0),
                                                         torch.device("cpu"), seed=0), 60)
            for label in batch["label"].tolist()}
    held = {tuple(label) for label in dataset.labels[dataset.held_out].tolist()}
    train = {tuple(label) for label in dataset.labels[~dataset.held_out].tolist()}
    assert len(held) == 40 and not seen & held and seen == train  # 480 draws cover all 120 training views
    # resumable as before: batch 25 onwards equals a loader started at batch 25
    full = take(build_loader(dataset, 6, MemoryConfig(loader_workers=0), torch.device("cpu"), seed=1), 30)
    resumed = take(build_loader(dataset, 6, MemoryConfig(loader_workers=0), torch.device("cpu"), seed=1,
                                start_batch=25), 5)
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(full[25:], resumed))


def test_holdout_of_a_real_folder_and_its_errors(tmp_path):
    for spec in ("specA", "specB"):
        for deg in (0, 90, 180, 270):
            write_image(tmp_path / spec / f"0_{deg:04d}.png")
    write_image(tmp_path / "specB" / "0.5_0045.png")  # the azimuth grid: 0, 45, 90, 180, 270 (every class's)
    dataset = MultiViewFolder(tmp_path, with_holdout(folder_cfg(tmp_path), every_k_azimuth=2))
    assert dataset.labels[dataset.held_out].tolist() == [[c, 0, d] for c in (0, 1) for d in (0, 90, 270)]
    assert dataset.holdout_indices.tolist() == dataset.held_out.nonzero().flatten().tolist()
    assert dataset.holdout_record["azimuths_deg"] == {"0": [0, 90, 270]}
    loader = build_loader(dataset, 2, MemoryConfig(loader_workers=0), torch.device("cpu"), seed=0)
    assert {d for b in take(loader, 20) for d in b["label"][:, 2].tolist()} == {45, 180}
    # a holdout that selects nothing, or all of a class, stops the training before it starts
    nothing = MultiViewFolder(tmp_path, with_holdout(folder_cfg(tmp_path), every_k_azimuth=0,
                                                     azimuth_ranges=["10-20"]))
    with pytest.raises(DatasetError, match=r"data.holdout selects no view of .*azimuth_ranges=\['10-20'\]"):
        build_loader(nothing, 2, MemoryConfig(loader_workers=0), torch.device("cpu"), seed=0)
    everything = MultiViewFolder(tmp_path, with_holdout(folder_cfg(tmp_path), every_k_azimuth=0,
                                                        azimuth_ranges=["0-360"], elevations=[0]))
    with pytest.raises(DatasetError, match="holds out every view of class 'specA'"):
        build_loader(everything, 2, MemoryConfig(loader_workers=0), torch.device("cpu"), seed=0)


def test_build_dataset_synthetic(tmp_path):
    ds = build_dataset(small_cfg(tmp_path / "syn", num_azimuths=4), CAM)
    assert ds.root == tmp_path / "syn" and len(ds) == 2 * 4 * 4 and ds.num_classes == 2


# --------------------------------------------------------------------------- command line


def test_cli_prepare_then_info(tmp_path, capsys):
    overrides = [f"data.root={tmp_path / 'cli'}", "data.image_size=16", "data.synthetic.num_azimuths=4"]
    assert cli_main(["info", *overrides]) == 5  # data errors exit 5
    assert "not built yet" in capsys.readouterr().err
    assert cli_main(["prepare", *overrides]) == 0
    out = capsys.readouterr().out
    expected = [str(tmp_path / "cli"), "class0_column", "16 images", "16x16", "53.1 deg", "step 90 deg", "fingerprint"]
    for text in expected + ["rendered in"]:
        assert text in out
    assert cli_main(["info", "+exp=smoke", *overrides]) == 0
    assert "status       built" in capsys.readouterr().out
    assert cli_main(["info", "data=folder", f"data.root={tmp_path / 'cli'}", "data.image_size=16"]) == 0
    assert "kind         folder" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0 and "prepare" in capsys.readouterr().out


def test_cli_reports_bad_override(capsys):
    assert cli_main(["info", "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
