"""One GAN training iteration: a discriminator step and a generator step.

The step holds no global state: models, optimisers, scalers and its own random
generator live on the :class:`GanStep` object, so several can coexist (tests,
benchmarks, a future DDP wrapper). Nothing here calls ``.item()`` or branches on
tensor values unless ``check_finite`` asks for it, so the whole step also runs
under ``FakeTensorMode`` (the memory estimator).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from grafccsr.config import Config, ConfigError
from grafccsr.models.ccsr import consistency_weight
from grafccsr.models.render import RenderSettings
from grafccsr.models.poses import poses_from_labels, sample_random_poses
from grafccsr.models.rays import PatchSampler, sample_patches, upsample_grid
from grafccsr.training.amp import AmpPolicy, amp_policy
from grafccsr.training.distributed import Dist
from grafccsr.training.losses import (
    MultiTaskCrossEntropy,
    ccsr_consistency_loss,
    coarse_match_loss,
    d_loss,
    g_loss,
    r1_penalty,
)


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or Inf; the update was not applied."""

    def __init__(self, name: str, iteration: int, value: float) -> None:
        super().__init__(f"loss '{name}' is {value} at iteration {iteration}")
        self.name, self.iteration, self.value = name, iteration, value


@dataclass
class Batch:
    """A batch of real data on the training device.

    images: (B, 3, H, W) in [-1, 1]; labels: (B, 3) int64 = (class, elev_idx, azimuth_deg).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def split(self, parts: int) -> List["Batch"]:
        return [Batch(i, lab) for i, lab in zip(self.images.chunk(parts), self.labels.chunk(parts))]


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Stop gradients into ``module`` for the duration (restores each flag)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def build_optimizer(params, lr: float, cfg) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=t.rmsprop_alpha, eps=t.optim_eps, foreach=True)
    return torch.optim.Adam(params, lr=lr, betas=tuple(t.adam_betas), eps=t.optim_eps, foreach=True)


D_SUMS = ("loss/d", "loss/r1", "loss/aux_d", "d/real_logit", "d/fake_logit", "perf/points_per_ray")
G_SUMS = ("loss/g", "loss/ccsr", "loss/coarse", "loss/aux_g", "perf/points_per_ray", "perf/graph_points_per_ray")
"""What each step returns (means over its micro-batches). ``perf/points_per_ray``: field
evaluations per rendered ray, measured (fewer than configured where the occupancy grid or the
ball skip empty rays, or early termination finished ones); ``perf/graph_points_per_ray``: those
evaluated with autograd in the G step (fewer with ``memory.skip_empty_samples``)."""


class GanStep:
    """The models, optimisers, scalers, EMA and the D/G update rules of one training run.

    Under ``torchrun`` (``dist.enabled``) every rank holds the same models; the random inputs
    (latent codes, poses, patch grids) are drawn for the global batch from a stream shared by
    all ranks and each rank takes its shard, so that ``world_size`` ranks compute exactly what
    one process with the global batch would; the renderer's jitter comes from a per-rank
    stream. Gradients and the logged losses are averaged over the ranks after each step.
    """

    def __init__(self, cfg: Config, generator: nn.Module, discriminator: nn.Module, device: torch.device,
                 dist: Dist = Dist()) -> None:
        self.cfg = cfg
        self.device = device
        self.dist = dist
        self.generator = generator
        self.discriminator = discriminator
        self.generator_ema: Optional[nn.Module] = None
        if cfg.train.ema_beta > 0:
            self.generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
        self.opt_g = build_optimizer(generator.parameters(), cfg.train.lr_g, cfg)
        self.opt_d = build_optimizer(discriminator.parameters(), cfg.train.lr_d, cfg)
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, cfg.train.lr_milestones, cfg.train.lr_gamma)
        self.sched_d = torch.optim.lr_scheduler.MultiStepLR(self.opt_d, cfg.train.lr_milestones, cfg.train.lr_gamma)
        self.policy: AmpPolicy = amp_policy(cfg.train.amp, device)
        self.scaler_g = self.policy.make_scaler()
        self.scaler_d = self.policy.make_scaler()
        self.patch_sampler = PatchSampler(cfg.model.patch, image_size=cfg.data.image_size)
        self.render_settings = RenderSettings.from_config(cfg)
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(cfg.train.seed)
        self.render_rng = self.rng  # one process: one stream (what resume tests and old runs reproduce)
        if dist.enabled:
            self.render_rng = torch.Generator(device=device)
            self.render_rng.manual_seed(cfg.train.seed + 1_000_003 * (dist.rank + 1))
        self.aux_loss: Optional[MultiTaskCrossEntropy] = None
        if cfg.model.discriminator.aux_classifier:
            tasks = list(discriminator.n_each_task)
            if len(tasks) != 1:
                raise ConfigError(
                    f"model.discriminator.n_each_task={tasks}: targets for several tasks need a class-to-task "
                    "table, which the datasets do not provide yet; use one task (the class)"
                )
            self.aux_loss = MultiTaskCrossEntropy(tasks)

    # ----------------------------------------------------------------- helpers

    @property
    def ccsr_mode(self) -> str:
        return self.cfg.model.ccsr.mode

    def modules_and_optimizers(self) -> Tuple:
        return (self.generator, self.discriminator, self.generator_ema, self.opt_g, self.opt_d)

    def _poses(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.model.pose.mode == "known":
            return poses_from_labels(labels, self.cfg.data.elevation_v)
        u, v = sample_random_poses(labels.shape[0] * self.dist.world_size, self.cfg.model.pose, self.device,
                                   generator=self.rng)
        return self.dist.shard(u), self.dist.shard(v)

    def _grids(self, batch: int, iteration: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This rank's patch grids (B,P,P,2) of the global batch and, when CCSR runs, the same
        regions at scale x density."""
        grid, _ = self.patch_sampler.sample(batch * self.dist.world_size, iteration, self.device, generator=self.rng)
        grid = self.dist.shard(grid)
        hr_grid = upsample_grid(grid, self.cfg.model.ccsr.scale) if self.ccsr_mode != "off" else None
        return grid, hr_grid

    def draw_fakes(self, labels: torch.Tensor, iteration: int) -> Dict[str, torch.Tensor]:
        """The random inputs of this rank's batch of fakes: z, pose (u, v), patch grid(s).

        Drawn for the whole (global) batch before it is split into micro-batches, so that
        gradient accumulation and several ranks see exactly the inputs one full batch would.
        """
        z = self.dist.shard(self.generator.sample_z(labels.shape[0] * self.dist.world_size, self.device,
                                                    generator=self.rng))
        u, v = self._poses(labels)
        grid, hr_grid = self._grids(labels.shape[0], iteration)
        inputs = {"labels": labels, "z": z, "u": u, "v": v, "grid": grid}
        if hr_grid is not None:
            inputs["hr_grid"] = hr_grid
        return inputs

    def real_patches(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        """Real patches at the discriminator's resolution (scale*P in CCSR discriminator mode)."""
        grid, hr_grid = self._grids(images.shape[0], iteration)
        target = hr_grid if self.ccsr_mode == "discriminator" else grid
        return sample_patches(images, target, antialias=self.cfg.model.patch.antialias)

    def render_fakes(self, inputs: Dict[str, torch.Tensor], iteration: int, *, for_d: bool = False
                     ) -> Dict[str, torch.Tensor]:
        """Render fakes for ``draw_fakes`` inputs; runs CCSR when enabled, except as a regulariser
        for the D step (``for_d``), which only needs what D sees (the original ran it in the G step only).

        Returns ``rgb`` (B,3,P,P), ``sr`` (B,3,sP,sP) when CCSR runs, ``d_input`` (what D sees),
        ``points`` (field evaluations per ray, B,1,P,P) and, when a fine network's coarse pass
        trains, ``coarse_rgb`` (B,3,P,P).
        """
        g, policy = self.generator, self.policy
        with policy.autocast(policy.render):
            out = g.render(inputs["z"], inputs["labels"][:, 0], inputs["u"], inputs["v"], inputs["grid"],
                           self.render_settings, iteration=iteration, rng=self.render_rng)
        fakes = {"rgb": out["rgb"], "d_input": out["rgb"], "points": out["points"]}
        if "graph_points" in out:
            fakes["graph_points"] = out["graph_points"]
        if "coarse_rgb" in out:
            fakes["coarse_rgb"] = out["coarse_rgb"]
        if self.ccsr_mode == "discriminator" or (self.ccsr_mode == "regularizer" and not for_d):
            with policy.autocast(policy.sr):
                fakes["sr"] = g.super_resolve(out["rgb"], inputs["u"], inputs["hr_grid"],
                                              no_grad=self.cfg.memory.ccsr_no_grad)
            if self.ccsr_mode == "discriminator":
                # the reals lie in [-1, 1]; the original clamped the SR output before D too
                fakes["d_input"] = fakes["sr"].clamp(-1.0, 1.0)
        return fakes

    @staticmethod
    def _split(inputs: Dict[str, torch.Tensor], parts: int) -> List[Dict[str, torch.Tensor]]:
        chunks = {k: v.chunk(parts) for k, v in inputs.items()}
        return [{k: chunks[k][i] for k in inputs} for i in range(parts)]

    def _apply_update(self, name: str, sums: Dict[str, torch.Tensor], optimizer, scaler, scheduler,
                      iteration: int, check_finite: bool) -> bool:
        """Average gradients and losses over the ranks, then step optimiser, scaler and schedule
        unless ``sums[name]`` is not finite (then the gradients are dropped and
        ``sums["skipped"]`` is set). True if applied. Every rank decides alike: on averages."""
        if self.dist.enabled:
            sums.update(self.dist.average_gradients(_params(optimizer), sums))
        if check_finite and not self._check(name, sums[name], iteration):
            optimizer.zero_grad(set_to_none=True)
            sums["skipped"] = torch.ones((), device=self.device)
            return False
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return True

    def _check(self, name: str, value: torch.Tensor, iteration: int) -> bool:
        """True if finite. With nan_policy=stop, raise instead of returning False."""
        if bool(torch.isfinite(value)):
            return True
        if self.cfg.train.nan_policy == "stop":
            raise NonFiniteLoss(name, iteration, float(value))
        return False

    # ----------------------------------------------------------------- D step

    def d_step(self, batch: Batch, iteration: int, check_finite: bool = True) -> Dict[str, torch.Tensor]:
        cfg, mem, policy, d = self.cfg, self.cfg.memory, self.policy, self.discriminator
        accum = cfg.train.grad_accum_steps
        r1_now = cfg.train.r1_gamma > 0 and iteration % cfg.train.r1_every == 0
        self.opt_d.zero_grad(set_to_none=mem.set_to_none)
        sums = {k: torch.zeros((), device=self.device) for k in D_SUMS}
        reals = self.real_patches(batch.images, iteration).chunk(accum)
        fake_inputs = self._split(self.draw_fakes(batch.labels, iteration), accum)
        for micro, real, inputs in zip(batch.split(accum), reals, fake_inputs):
            class_idx = micro.labels[:, 0]
            if r1_now:
                real.requires_grad_(True)
            # R1 needs the real forward in FP32, so autocast stays off for it on R1 steps.
            with policy.autocast(policy.discriminator and not r1_now):
                real_logits, real_aux = d(real, class_idx)
            if mem.fakes_without_graph:
                with torch.no_grad():
                    fakes = self.render_fakes(inputs, iteration, for_d=True)
            else:
                fakes = self.render_fakes(inputs, iteration, for_d=True)
            fake, points = fakes["d_input"], fakes["points"]
            del fakes
            sums["perf/points_per_ray"] += points.float().mean() / accum
            with policy.autocast(policy.discriminator):
                fake_logits, _ = d(fake.detach(), class_idx)
            if mem.eager_free:
                del fake  # frees the generator's graph (if any) before D's backward
            loss = d_loss(real_logits.float(), fake_logits.float())
            total = loss
            if self.aux_loss is not None:
                aux = self.aux_loss(real_aux.float(), class_idx[:, None])
                total = total + cfg.train.aux_weight * aux
                sums["loss/aux_d"] += aux.detach() / accum
            if r1_now:
                r1 = r1_penalty(real_logits, real)
                total = total + cfg.train.r1_gamma * cfg.train.r1_every * r1
                sums["loss/r1"] += r1.detach() / accum
            sums["loss/d"] += total.detach() / accum
            sums["d/real_logit"] += real_logits.detach().float().mean() / accum
            sums["d/fake_logit"] += fake_logits.detach().float().mean() / accum
            self.scaler_d.scale(total / accum).backward()
            if mem.eager_free:
                del real, real_logits, real_aux, fake_logits, loss, total
        self._apply_update("loss/d", sums, self.opt_d, self.scaler_d, self.sched_d, iteration, check_finite)
        return sums

    # ----------------------------------------------------------------- G step

    def g_step(self, batch: Batch, iteration: int, check_finite: bool = True) -> Dict[str, torch.Tensor]:
        cfg, mem, policy, d = self.cfg, self.cfg.memory, self.policy, self.discriminator
        accum = cfg.train.grad_accum_steps
        self.opt_g.zero_grad(set_to_none=mem.set_to_none)
        sums = {k: torch.zeros((), device=self.device) for k in G_SUMS}
        alpha = consistency_weight(cfg.model.ccsr, iteration)
        fake_inputs = self._split(self.draw_fakes(batch.labels, iteration), accum)
        with frozen(d):
            for inputs in fake_inputs:
                class_idx = inputs["labels"][:, 0]
                fakes = self.render_fakes(inputs, iteration)
                with policy.autocast(policy.discriminator):
                    fake_logits, fake_aux = d(fakes["d_input"], class_idx)
                loss = g_loss(fake_logits.float())
                total = loss
                if self.ccsr_mode == "regularizer":
                    ccsr = ccsr_consistency_loss(fakes["sr"].float(), fakes["rgb"].float())
                    total = total + alpha * ccsr
                    sums["loss/ccsr"] += ccsr.detach() / accum
                if "coarse_rgb" in fakes:
                    coarse = coarse_match_loss(fakes["coarse_rgb"].float(), fakes["rgb"].float())
                    total = total + cfg.model.render.coarse_loss_weight * coarse
                    sums["loss/coarse"] += coarse.detach() / accum
                if self.aux_loss is not None:
                    aux = self.aux_loss(fake_aux.float(), class_idx[:, None])
                    total = total + cfg.train.aux_weight * aux
                    sums["loss/aux_g"] += aux.detach() / accum
                sums["loss/g"] += total.detach() / accum
                sums["perf/points_per_ray"] += fakes["points"].float().mean() / accum
                sums["perf/graph_points_per_ray"] += fakes["graph_points"].float().mean() / accum
                self.scaler_g.scale(total / accum).backward()
                if mem.eager_free:
                    del fakes, fake_logits, fake_aux, loss, total
        if self._apply_update("loss/g", sums, self.opt_g, self.scaler_g, self.sched_g, iteration, check_finite):
            self.update_ema()
        return sums

    def abort(self, phase: str, status: int) -> None:
        """Join the gradient collective of ``phase`` (d_step/g_step) after a failure on this
        rank, carrying ``status``: the other ranks, blocked in it, learn of the failure."""
        if not self.dist.enabled:
            return
        optimizer, names = (self.opt_d, D_SUMS) if phase == "d_step" else (self.opt_g, G_SUMS)
        params = _params(optimizer)
        for p in params:
            p.grad = None
        self.dist.average_gradients(params, {k: torch.zeros((), device=self.device) for k in names}, status)

    def occupancy_due(self, iteration: int) -> bool:
        """Whether the generator's occupancy grid is updated after ``iteration`` (``model.occupancy``)."""
        return self.generator.occupancy is not None and self.generator.occupancy.due(iteration)

    def update_occupancy(self, iteration: int) -> None:
        """Update the generator's occupancy grid from its own density (the same draws on every
        rank: every rank computes the same grid) and hand it to the EMA copy at once."""
        self.generator.update_occupancy(iteration, self.render_settings, self.cfg.train.seed)
        if self.generator_ema is not None:
            for ema_buffer, buffer in zip(self.generator_ema.occupancy.buffers(), self.generator.occupancy.buffers()):
                ema_buffer.copy_(buffer)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.generator_ema is None:
            return
        beta = self.cfg.train.ema_beta
        ema_params = list(self.generator_ema.parameters())
        params = [p.detach() for p in self.generator.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for ema_buffer, buffer in zip(self.generator_ema.buffers(), self.generator.buffers()):
            ema_buffer.copy_(buffer)

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator used for samples and evaluation (EMA when enabled)."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    # ----------------------------------------------------------------- state

    def state_dict(self) -> Dict:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_ema": None if self.generator_ema is None else self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "step_rng": self.rng.get_state(),
        }

    def rank_state(self) -> Dict:
        """What differs between ranks: the renderer's jitter stream."""
        return {"render_rng": self.render_rng.get_state()}

    def load_rank_state(self, state: Dict) -> None:
        if self.dist.enabled and state.get("render_rng") is not None:
            self.render_rng.set_state(state["render_rng"])

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`. Models whose shapes differ from the checkpoint's (a
        config that changes the architecture) raise ConfigError naming the first mismatch."""
        for name, module in (("generator", self.generator), ("discriminator", self.discriminator)):
            _check_fits(name, module, state[name])
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.generator_ema is not None and state.get("generator_ema") is not None:
            self.generator_ema.load_state_dict(state["generator_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.rng.set_state(state["step_rng"])


def _check_fits(name: str, module: nn.Module, stored: Dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for key in sorted(set(own) | set(stored)):
        if key not in stored or key not in own:
            where = "this config" if key not in stored else "the checkpoint"
            raise ConfigError(f"{name}.{key} exists only in {where}: the config builds another architecture "
                              "than the checkpoint's")
        if own[key].shape != stored[key].shape:
            raise ConfigError(f"{name}.{key} has shape {tuple(stored[key].shape)} in the checkpoint but "
                              f"{tuple(own[key].shape)} with this config: an override changes the model's shape")


def _params(optimizer: torch.optim.Optimizer) -> list:
    """The parameters an optimiser updates, in its order (the order every rank flattens them in)."""
    return [p for group in optimizer.param_groups for p in group["params"]]
