"""Config composition and validation: every preset composes, bad input fails early with the key named."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from grafccsr.config import CONF_DIR, ConfigError, load_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


def test_presets_exist():
    assert {"smoke", "amp_bs8", "baseline_fp32", "seed_all", "graf_ccsr_original"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp):
    cfg = load_config([f"+exp={exp}"])
    assert cfg.exp_name == exp


def test_default_has_no_exp_and_uses_embedded_data():
    cfg = load_config()
    assert cfg.exp_name == "default"
    assert cfg.data.kind == "synthetic"
    assert "exp" not in (CONF_DIR / "config.yaml").read_text().split("defaults:")[1].split("hydra:")[0]


def test_presets_set_what_they_claim():
    base = load_config(["+exp=baseline_fp32"]).memory
    assert not (base.set_to_none or base.eager_free or base.fakes_without_graph or base.non_blocking)
    seed = load_config(["+exp=seed_all"])
    assert seed.memory.ccsr_no_grad and seed.train.amp.policy == "all" and seed.train.amp.dtype == "fp16"
    amp = load_config(["+exp=amp_bs8"])
    assert amp.train.batch_size == 8 and amp.train.amp.policy != "off"
    orig = load_config(["+exp=graf_ccsr_original"])
    assert (orig.model.patch.sampling, orig.model.patch.rays_per_patch, orig.model.render.samples_per_ray) == ("full", 4096, 64)
    assert orig.train.r1_gamma == 80 and orig.model.ccsr.mode == "regularizer"


def test_misspelt_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["model.patch.rays_per_patchh=1024"])
    assert "rays_per_patchh" in str(err.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        load_config(["train.batch_size=eight"])
    assert "batch_size" in str(err.value)


def test_unknown_key_in_a_yaml_file_fails(tmp_path):
    from grafccsr.config import Config, to_config
    from omegaconf import OmegaConf

    with pytest.raises(Exception) as err:
        to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create({"train": {"batchsize": 4}})))
    assert "batchsize" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.patch.rays_per_patch=2048", "model.patch.rays_per_patch"),
        ("model.patch.rays_per_patch=144", "model.patch.rays_per_patch"),
        ("model.ccsr.mode=sometimes", "model.ccsr.mode"),
        ("model.ccsr.scale=5", "model.ccsr.scale"),
        ("train.amp.policy=half", "train.amp.policy"),
        ("train.grad_accum_steps=3", "train.grad_accum_steps"),
        ("data.elevation_v=[0.5,0.4]", "data.elevation_prefixes"),
        ("data.elevation_v=[0.5,0.4,0.3,1.2]", "data.elevation_v[3]"),
        ("eval.kid_subset_size=100000", "eval.kid_subset_size"),
        ("model.field.z_shape_dim=7", "model.z_dim"),
        ("data.kind=folder", "data.root"),
        ("train.device=tpu", "train.device"),
        ("model.ccsr.num_views=7", "model.ccsr.num_views"),
        ("memory.checkpoint_segment_points=0", "memory.checkpoint_segment_points"),
        ("memory.no_grad_segment_points=-1", "memory.no_grad_segment_points"),
    ],
)
def test_impossible_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert key in str(err.value)


def test_non_square_message_offers_neighbours():
    with pytest.raises(ConfigError, match=r"2025 \(45\^2\) and 2116 \(46\^2\)"):
        load_config(["model.patch.rays_per_patch=2048"])


def test_ccsr_scale_that_does_not_fit_the_image():
    with pytest.raises(ConfigError, match="model.ccsr.scale"):
        load_config(["model.ccsr.mode=discriminator", "model.ccsr.scale=8", "model.patch.rays_per_patch=1024"])


def test_train_cli_prints_composed_config():
    import subprocess, sys

    out = subprocess.run([sys.executable, "-m", "grafccsr.train", "--cfg", "job", "+exp=amp_bs8"],
                         capture_output=True, text=True, timeout=120, cwd=Path(CONF_DIR).parent)
    assert out.returncode == 0, out.stderr
    assert "samples_per_ray: 64" in out.stdout and "exp_name: amp_bs8" in out.stdout


def test_memory_lean_group_adds_checkpointing_to_the_defaults():
    lean, default = load_config(["memory=lean"]).memory, load_config([]).memory
    assert lean.grad_checkpoint and not default.grad_checkpoint
    assert lean.checkpoint_segment_points == lean.no_grad_segment_points == 4096
    assert (lean.set_to_none, lean.fakes_without_graph, lean.eager_free) == (
        default.set_to_none, default.fakes_without_graph, default.eager_free)
