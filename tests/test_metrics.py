"""FID/KID via torch-fidelity: correctness against an independent computation, the
offline extractor, pose sampling of the fakes, the real-statistics cache."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from grafccsr.config import ConfigError, load_config
from grafccsr.metrics import fidelity
from grafccsr.metrics.fidelity import (
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    RANDOM_FEATURES,
    ExtractorWeightsError,
    evaluate_generator,
    extract_features,
    fid_kid,
    kid_subsets_for,
    real_stats_key,
    sample_eval_poses,
)

# ----------------------------------------------------------------------------- fixtures


def smooth_images(n: int, seed: int, size: int = 32, shift: float = 0.0) -> torch.Tensor:
    """uint8 (n, 3, size, size): upsampled 4x4 colour noise plus fine noise, + brightness shift."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, size, size, generator=gen) + shift
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def fake_dataset(num_classes: int = 2, azimuths: int = 8, elevations=(0.5, 0.3), size: int = 32, seed: int = 0):
    """Stand-in for MultiViewFolder: images, labels (class, elev, deg), poses (u, v)."""
    labels = torch.tensor(
        [(c, e, deg) for c in range(num_classes) for e in range(len(elevations))
         for deg in range(0, 360, 360 // azimuths)],
        dtype=torch.int64,
    )
    ev = torch.tensor(elevations, dtype=torch.float32)
    poses = torch.stack((labels[:, 2].float() / 360.0, ev[labels[:, 1]]), dim=1)
    return SimpleNamespace(
        images=smooth_images(labels.shape[0], seed, size),
        labels=labels,
        poses=poses,
        num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)],
    )


@pytest.fixture(scope="module")
def sets():
    return smooth_images(64, seed=1), smooth_images(64, seed=2, shift=0.1)


@pytest.fixture(scope="module")
def whole_set_result(sets):
    """torch-fidelity on the two sets with ONE KID subset = the whole of both sets."""
    a, b = sets
    return fid_kid(a, b, kid_subset_size=64, kid_subsets=10, batch_size=32, seed=3)


@pytest.fixture(scope="module")
def features(sets):
    a, b = sets
    return extract_features(a).double().numpy(), extract_features(b).double().numpy()


def numpy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_unbiased_poly_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (KID's kernel)."""
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


# ----------------------------------------------------------------------------- package


def test_importing_metrics_does_not_import_torch_fidelity():
    code = ("import sys, grafccsr.metrics, grafccsr.metrics.fidelity; "
            "assert 'torch_fidelity' not in sys.modules, 'torch_fidelity imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lazy_export():
    from grafccsr.metrics import evaluate_generator as exported

    assert exported is evaluate_generator


# ----------------------------------------------------------------------------- FID / KID values


def test_fid_of_a_set_with_itself_is_zero_and_positive_against_another(sets, whole_set_result):
    a, _ = sets
    same = fid_kid(a, a, kid_subset_size=32, kid_subsets=5, batch_size=32)
    assert abs(same["fid"]) < 1e-4
    assert whole_set_result["fid"] > 0.1  # brightness-shifted set: clearly apart
    assert whole_set_result["fid"] > 1000 * abs(same["fid"])
    # KID's subsets of the two copies differ, so it is only ~0 (unbiased estimator noise)
    assert abs(same["kid_mean"]) < 0.05 * whole_set_result["kid_mean"]


def test_fid_and_kid_match_an_independent_numpy_scipy_computation(whole_set_result, features):
    """Same features (the registered extractor), independent maths: Frechet distance
    via scipy.linalg.sqrtm, KID as the unbiased polynomial MMD over the single subset
    that is the whole of both sets. Tolerance: 1e-4 relative (FID), 1e-5 absolute
    (KID; torch-fidelity forms the kernel in float32)."""
    f1, f2 = features
    assert f1.shape == (64, 256)
    assert whole_set_result["kid_subsets"] == 1  # subset size == both set sizes -> one subset
    assert whole_set_result["fid"] == pytest.approx(numpy_fid(f1, f2), rel=1e-4)
    assert whole_set_result["kid_mean"] == pytest.approx(numpy_unbiased_poly_mmd(f1, f2), abs=1e-5)
    assert whole_set_result["kid_std"] == 0.0


def test_kid_subsets_match_an_independent_computation(sets, features):
    """Several subsets: the same subsets as torch-fidelity (np.random.RandomState(seed),
    one choice without replacement per side per subset), independent MMD maths."""
    a, b = sets
    f1, f2 = features
    seed, size, subsets = 7, 24, 6
    result = fid_kid(a, b[:48], kid_subset_size=size, kid_subsets=subsets, batch_size=32, seed=seed)
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        i1 = rng.choice(64, size, replace=False)
        i2 = rng.choice(48, size, replace=False)
        mmds.append(numpy_unbiased_poly_mmd(f1[i1], f2[:48][i2]))
    assert result["kid_subsets"] == subsets
    assert result["kid_mean"] == pytest.approx(float(np.mean(mmds)), abs=1e-5)
    assert result["kid_std"] == pytest.approx(float(np.std(mmds)), abs=1e-5)
    assert result["fid"] == pytest.approx(numpy_fid(f1, f2[:48]), rel=1e-4)


def test_kid_subset_rules():
    assert kid_subsets_for(16, 16, 16, 50) == (16, 1)  # every subset would be both whole sets
    assert kid_subsets_for(64, 16, 16, 50) == (16, 50)  # reals still vary between subsets
    assert kid_subsets_for(10, 16, 16, 4) == (10, 4)  # more than the real set holds: clamped


def test_kid_subset_larger_than_num_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="kid_subset_size"):
        load_config(["+exp=smoke", "eval.num_samples=10", "eval.kid_subset_size=20"])


# ----------------------------------------------------------------------------- extractor


def test_random_feature_extractor_is_deterministic():
    images = smooth_images(6, seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = extract_features(images, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state), "building the extractor consumed the global RNG"
    torch.manual_seed(999)
    torch.rand(10)
    second = extract_features(images, batch_size=6)
    assert first.shape == (6, 256)
    assert torch.allclose(first, second, atol=1e-5)
    assert first.std(dim=0).mean() > 1e-4  # not constant
    # input size is normalised: the same pictures at another resolution give close features
    bigger = F.interpolate(images.float(), size=64, mode="bilinear", align_corners=False).round().to(torch.uint8)
    assert extract_features(bigger).shape == (6, 256)


def test_random_features_registered_with_torch_fidelity():
    import grafccsr.metrics.extractors as ex
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[RANDOM_FEATURES] is ex.RandomFeatureExtractor
    ex.register()  # idempotent
    assert ex.RandomFeatureExtractor.get_default_feature_layer_for_metric("fid") == "256"


# ----------------------------------------------------------------------------- inception weights


def test_inception_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3.endswith(INCEPTION_WEIGHTS_FILE)


def test_inception_without_weights_is_a_clear_error_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = load_config(["+exp=smoke", f"eval.cache_dir={tmp_path / 'cache'}", f"eval.extractor={INCEPTION}"])
    calls = []
    monkeypatch.setattr("grafccsr.models.views.render_views", lambda *a, **k: calls.append(1))
    with pytest.raises(ExtractorWeightsError) as info:
        evaluate_generator(StubGenerator(), fake_dataset(), cfg, torch.device("cpu"))
    message = str(info.value)
    assert "eval.weights_path" in message and INCEPTION_WEIGHTS_URL in message
    assert isinstance(info.value, ConfigError)
    assert not calls, "rendered before failing"
    # torch-fidelity's own download location counts as local
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert fidelity.inception_weights_path(None) == str(cached)


def test_inception_weights_path_reaches_torch_fidelity(tmp_path, monkeypatch):
    """Plumbing: eval.weights_path arrives as torch-fidelity's feature_extractor_weights_path
    (a spy stands in for the 2048-d InceptionV3 so that this stays fast)."""
    import grafccsr.metrics.extractors as ex
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    seen = []

    class Spy(ex.RandomFeatureExtractor):
        def __init__(self, name, features_list, **kwargs):
            seen.append(kwargs.get("feature_extractor_weights_path"))
            super().__init__(name, ["256"])

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "256"

    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(FEATURE_EXTRACTORS_REGISTRY, INCEPTION, Spy)
    images = smooth_images(8, seed=4, size=16)
    fid_kid(images, images, extractor=INCEPTION, weights_path=str(weights), kid_subset_size=4, kid_subsets=2)
    assert seen and all(path == str(weights) for path in seen)


@pytest.mark.slow
def test_inception_weights_file_is_what_torch_fidelity_loads(tmp_path, monkeypatch):
    """The real InceptionV3 of torch-fidelity: features follow the weights file, no download."""
    from torch_fidelity import feature_extractor_inceptionv3 as inc

    with monkeypatch.context() as m, torch.random.fork_rng(devices=[]):
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(1)
        state = inc.FeatureExtractorInceptionV3(INCEPTION, ["2048"]).state_dict()
    w1, w2 = tmp_path / "w1.pth", tmp_path / "w2.pth"
    torch.save(state, w1)
    state["Conv2d_1a_3x3.conv.weight"] = -state["Conv2d_1a_3x3.conv.weight"]
    torch.save(state, w2)

    def no_download(*a, **k):
        raise AssertionError("torch-fidelity tried to download the inception weights")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_download)
    images = smooth_images(2, seed=4, size=16)
    f1 = extract_features(images, INCEPTION, weights_path=str(w1))
    f2 = extract_features(images, INCEPTION, weights_path=str(w2))
    assert f1.shape == (2, 2048)
    assert not torch.allclose(f1, f2)
    assert real_stats_key(images, 32, INCEPTION, str(w1)) != real_stats_key(images, 32, INCEPTION, str(w2))


# ----------------------------------------------------------------------------- fakes' poses


def test_fake_poses_follow_the_real_pose_distribution():
    ds = fake_dataset(num_classes=3, azimuths=8, elevations=(0.5, 0.4, 0.3))
    class_idx, u, v = sample_eval_poses(ds, 200, seed=0)
    real = {(int(c), round(float(pu), 6), round(float(pv), 6))
            for c, (pu, pv) in zip(ds.labels[:, 0], ds.poses)}
    fake = [(int(c), round(float(a), 6), round(float(b), 6)) for c, a, b in zip(class_idx, u, v)]
    assert set(fake) <= real, "a sampled (class, u, v) is not a pose of the real set"
    assert len(set(fake)) >= 40  # 72 distinct poses, 200 draws: many of them, not one batch's 8
    assert {c for c, _, _ in fake} == {0, 1, 2}
    assert len({b for _, _, b in fake}) == 3
    again = sample_eval_poses(ds, 200, seed=0)
    other = sample_eval_poses(ds, 200, seed=1)
    assert all(torch.equal(x, y) for x, y in zip((class_idx, u, v), again))
    assert not torch.equal(u, other[1])


class StubGenerator(torch.nn.Module):
    """Anything with sample_z; the stubbed render_views below does the drawing."""

    z_dim = 4

    def sample_z(self, batch, device, generator=None):
        return torch.randn(batch, self.z_dim, generator=generator, device=device)


def stub_render(record):
    def render_views(generator, settings, z, class_idx, u, v, *, image_size, **kwargs):
        record.append((class_idx.clone(), u.clone(), v.clone(), image_size, kwargs))
        n = z.shape[0]
        level = (u * 2 - 1).view(n, 1, 1, 1) + 0.1 * class_idx.view(n, 1, 1, 1)
        return level.expand(n, 3, image_size, image_size).clamp(-1, 1).clone()

    return render_views


def test_evaluate_generator_renders_at_sampled_poses_and_caches_real_stats(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = load_config(["+exp=smoke", f"eval.cache_dir={cache}", "eval.num_samples=16",
                       "eval.kid_subset_size=8", "eval.kid_subsets=3", "eval.batch_size=5"])
    ds = fake_dataset()
    record = []
    monkeypatch.setattr("grafccsr.models.views.render_views", stub_render(record))
    torch.manual_seed(42)
    rng_before = torch.get_rng_state()

    result = evaluate_generator(StubGenerator(), ds, cfg, torch.device("cpu"), seed=5)

    assert torch.equal(torch.get_rng_state(), rng_before), "evaluation changed the global RNG"
    assert set(result) >= {"fid", "kid_mean", "kid_std", "extractor", "num_samples", "resolution"}
    assert result["extractor"] == RANDOM_FEATURES and result["num_samples"] == 16
    assert result["resolution"] == cfg.data.image_size == 32
    assert all(math.isfinite(result[k]) for k in ("fid", "kid_mean", "kid_std"))
    # the fakes were rendered exactly at the seeded draw from the real poses, in eval batches
    want = sample_eval_poses(ds, 16, seed=5)
    got = [torch.cat([r[i] for r in record]) for i in range(3)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert [r[0].shape[0] for r in record] == [5, 5, 5, 1]
    assert record[0][3] == 32 and record[0][4]["to_cpu"] == cfg.memory.eval_to_cpu
    # real statistics were cached under the fingerprint, and are reused
    key = real_stats_key(ds.images, 32, RANDOM_FEATURES)
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(name.startswith(key) for name in files)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = evaluate_generator(StubGenerator(), ds, cfg, torch.device("cpu"), seed=5)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    # another resolution: reals are resized, a new cache entry appears
    cfg16 = load_config(["+exp=smoke", f"eval.cache_dir={cache}", "eval.num_samples=16",
                         "eval.kid_subset_size=8", "eval.resolution=16"])
    small = evaluate_generator(StubGenerator(), ds, cfg16, torch.device("cpu"))
    assert small["resolution"] == 16 and record[-1][3] == 16
    key16 = real_stats_key(ds.images, 16, RANDOM_FEATURES)
    assert key16 != key and any(p.name.startswith(key16) for p in cache.iterdir())


def test_real_stats_key_changes_with_resolution_data_and_extractor():
    ds = fake_dataset()
    key = real_stats_key(ds.images, 32, RANDOM_FEATURES)
    assert key == real_stats_key(ds.images.clone(), 32, RANDOM_FEATURES)
    assert key != real_stats_key(ds.images, 16, RANDOM_FEATURES)
    changed = ds.images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert key != real_stats_key(changed, 32, RANDOM_FEATURES)  # one bit of one image
    assert key != real_stats_key(ds.images[:-1], 32, RANDOM_FEATURES)  # count
    assert key != real_stats_key(fake_dataset(seed=1).images, 32, RANDOM_FEATURES)  # other data


@pytest.mark.skipif(importlib.util.find_spec("grafccsr.models") is None, reason="grafccsr.models not written yet")
def test_evaluate_generator_with_the_smoke_generator(tmp_path):
    from grafccsr.models import build_models

    cfg = load_config(["+exp=smoke", f"eval.cache_dir={tmp_path}", "eval.num_samples=16", "eval.kid_subset_size=8"])
    ds = fake_dataset(size=cfg.data.image_size)
    generator, _ = build_models(cfg, ds.num_classes)
    generator.train()
    result = evaluate_generator(generator, ds, cfg, torch.device("cpu"), seed=0)
    assert generator.training, "train/eval mode not restored"
    assert all(math.isfinite(result[k]) for k in ("fid", "kid_mean", "kid_std"))
    assert result["fid"] > 0


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(2 * round(3 * sigma) + 1)
    taps = torch.exp(-0.5 * ((torch.arange(k) - k // 2) / sigma) ** 2)
    taps = taps / taps.sum()
    x = torch.nn.functional.pad(images.float(), (k // 2,) * 4, mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, k).expand(3, 1, 1, k), groups=3)
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, k, 1).expand(3, 1, k, 1), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8)


def _noisy(images: torch.Tensor, std: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * std * 127.5
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 288 samples of 256-d features: near-singular
def test_random_feature_fid_ranks_degraded_reals():
    """Is the offline FID a quality signal? On the embedded set (576 images, 64 px), FID_rf
    between the reals and a degraded copy grows with every blur level (sigma 1, 2, 3, 4 px)
    and every noise level (std 0.05 ... 0.2 of the [-1, 1] range), and the two random halves
    of the reals (sampling noise alone) score below the mildest of those degradations.
    Features come from the random-feature extractor; the Frechet distance is computed here."""
    from grafccsr.data import build_dataset
    from grafccsr.metrics import extract_features

    cfg = load_config([])
    reals = build_dataset(cfg.data, cfg.camera).images
    real_features = extract_features(reals).double().numpy()

    def fid(images: torch.Tensor) -> float:
        return numpy_fid(real_features, extract_features(images).double().numpy())

    blurred = [fid(_blur(reals, s)) for s in (1.0, 2.0, 3.0, 4.0)]
    noisy = [fid(_noisy(reals, s)) for s in (0.05, 0.1, 0.15, 0.2)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy
    half = torch.randperm(len(reals), generator=torch.Generator().manual_seed(0))
    split = numpy_fid(real_features[half[: len(half) // 2]], real_features[half[len(half) // 2:]])
    assert split < min(blurred[0], noisy[0]), (split, blurred, noisy)


def test_num_samples_alone_derives_the_kid_subset():
    """eval.num_samples=64 alone is enough: the KID subset size follows it (min(100, num_samples))."""
    assert load_config(["eval.num_samples=64"]).eval.kid_subset == 64
    assert load_config([]).eval.kid_subset == 100
    assert load_config(["eval.num_samples=64", "eval.kid_subset_size=32"]).eval.kid_subset == 32
