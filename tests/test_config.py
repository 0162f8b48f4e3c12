"""Config composition and validation: every preset composes, bad input fails early with the key named."""

from pathlib import Path

import pytest
from grafccsr.config import ConfigError, load_config
from grafccsr.paths import CONF_DIR

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
    assert not (base.set_to_none or base.eager_free or base.non_blocking)
    assert base.fakes_without_graph  # graf_ccsr's own D step rendered its fakes under no_grad
    seed = load_config(["+exp=seed_all"])
    assert seed.memory.ccsr_no_grad and seed.train.amp.policy == "all" and seed.train.amp.dtype == "fp16"
    amp = load_config(["+exp=amp_bs8"])
    assert amp.train.batch_size == 8 and amp.train.amp.policy != "off"
    orig = load_config(["+exp=graf_ccsr_original"])
    assert (orig.model.patch.sampling, orig.model.patch.rays_per_patch, orig.model.render.samples_per_ray) == ("full", 4096, 64)
    assert orig.train.r1_gamma == 80 and orig.model.ccsr.mode == "regularizer"


def test_misspelt_key_fails_naming_it_and_the_nearest_key():
    with pytest.raises(ConfigError) as err:
        load_config(["model.patch.rays_per_patchh=1024"])
    assert "model.patch.rays_per_patchh" in str(err.value) and "model.patch.rays_per_patch'" in str(err.value)
    assert "\n" not in str(err.value)


def test_appended_unknown_key_fails():
    with pytest.raises(ConfigError, match=r"train\.btach_size is not a config key; did you mean 'train\.batch_size'"):
        load_config(["+train.btach_size=2"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(["train.batch_size=eight"])
    assert "train.batch_size" in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_stored_values_fails():
    from grafccsr.config import from_dict

    with pytest.raises(ConfigError, match="train.batchsize is not a config key; did you mean 'train.batch_size'"):
        from_dict({"train": {"batchsize": 4}})


def test_composed_defaults_are_the_schema_defaults():
    """One source of defaults: conf/ composed without overrides is exactly Config()."""
    from grafccsr.config import Config

    assert load_config([]) == Config()


def test_group_files_restate_no_schema_default():
    """Each group option lists only what differs from the schema."""
    import dataclasses

    import yaml

    from grafccsr.config import Config

    def leaves(data, prefix=""):
        for k, v in data.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    defaults = Config()
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        group = path.parent.name
        if group == "exp":
            continue
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("defaults", None)
        section = getattr(defaults, group)
        for key, value in leaves(data):
            node = section
            for part in key.split("."):
                node = getattr(node, part)
            assert value != node or value == "???", f"{path.relative_to(CONF_DIR)}: {key}={value!r} restates the default"
        assert dataclasses.is_dataclass(section)


def test_graf_size_presets_use_graf_schedules():
    for exp in ("amp_bs8", "baseline_fp32", "seed_all"):
        cfg = load_config([f"+exp={exp}"])
        assert cfg.model.field.width == 256 and cfg.model.patch.rays_per_patch == 4096, exp
        assert cfg.train.ema_beta == 0.999 and cfg.eval.num_samples >= 1000, exp
        assert cfg.model.patch.anneal_every == 1000 and cfg.model.render.density_noise_decay_iters == 5000, exp
    orig = load_config(["+exp=graf_ccsr_original"])
    assert orig.train.ema_beta == 0.0 and (orig.train.lr_g, orig.train.lr_d) == (6e-4, 1e-4)
    assert orig.eval.num_samples >= 1000 and not orig.model.patch.antialias


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_memory_lean_composes_with_every_preset(exp):
    """memory=lean gives lean whatever the preset: presets choose memory by group, not by key."""
    import dataclasses

    def switches(memory):  # every memory setting but the measuring cadence, which smoke shortens
        return dataclasses.replace(memory, track_peak_every=0)

    lean = switches(load_config(["memory=lean"]).memory)
    assert switches(load_config([f"+exp={exp}", "memory=lean"]).memory) == lean
    assert switches(load_config(["memory=lean", f"+exp={exp}"]).memory) == lean


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
        ("data=folder", "data.root"),
        ("camera.near=5", "camera.near"),
        ("model.patch.min_scale_cap=1.5", "model.patch.min_scale_cap"),
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


@pytest.mark.parametrize("override, expected", [
    ("exp=smoke", "exp is a preset group, appended with a '+': use +exp=smoke"),
    ("+exp=smok", "did you mean 'exp=smoke'? (options: amp_bs8,"),
    ("model=smal", "did you mean 'model=small'? (options: graf, small)"),
    ("experiment=smoke", "presets are +exp=NAME (options: amp_bs8,"),
    ("+experiment=smoke", "presets are +exp=NAME"),
    ("trainer.max_steps=10", "grafccsr's key is train.max_iters"),
    ("+trainer.max_steps=10", "trainer.max_steps is not a config key; grafccsr's key is train.max_iters"),
    ("ckpt_path=runs/x", "grafccsr's key is resume"),
    ("tags=[a]", "grafccsr's key is tracking.tags"),
])
def test_hydra_habits_get_a_one_line_hint(override, expected):
    """What lightning-hydra-template users type first, and a missing '+' or a misspelt option,
    name what grafccsr calls it (one line, listing a group's options)."""
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_config_stored_before_held_out_views_holds_none_out():
    """A run from before ``data.holdout`` trained on every view: evaluating its checkpoint must not
    call training views held out (the default holds every 8th azimuth out)."""
    from grafccsr.config import from_dict, to_dict
    from grafccsr.config.load import upgrade

    stored = to_dict(load_config(["+exp=smoke"]))
    del stored["data"]["holdout"]
    assert from_dict(upgrade(stored)).data.holdout.every_k_azimuth == 0
    assert load_config(["+exp=smoke"]).data.holdout.every_k_azimuth == 8
