"""`maestro viz`: MAE reconstructions (paper Figure 2) from a run's checkpoints, on one CPU process."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import Quickstart
from maestro_cli import run_in_process, write_small_spec
from PIL import Image
from trainer_runs import checkpoint_state, launch, write_config

from mae_core.config import TrainConfig
from mae_core.data.augment import MEAN, STD, normalise
from mae_core.data.demo import build_demo, demo_samples
from mae_core.data.evaluation import display_stats, first_images
from mae_core.data.synthetic import synthetic_images
from mae_core.masking import num_visible
from mae_core.model import MaskedAutoencoderViT
from mae_core.reconstruct import (
    ReconstructionError,
    Reconstructions,
    find_checkpoint,
    load_model,
    reconstruct,
    reconstruct_run,
)
from mae_core.train import make_model, seed_everything
from orchestrator.profiles import load_profile
from orchestrator.registry import Registry, RunState
from orchestrator.spec import load_spec
from orchestrator.sweep import expand
from orchestrator.viz import PAD_PX, PANEL_PX, TITLE_PX, figure_px


@pytest.fixture(scope="module")
def quickstart(readme_quickstart: Quickstart) -> tuple[Registry, RunState]:
    """The model the README's quickstart trained: jobs/quickstart.yaml on the demo photos."""
    registry, state, _ = readme_quickstart
    assert state.status == "completed" and state.step == state.total_steps, state
    return registry, state


def run_config(registry: Registry, state: RunState) -> TrainConfig:
    return registry.spec(state.experiment, state.run_id).train_config(
        output=registry.run_url(state.experiment, state.run_id))


def masked_mse(r: Reconstructions, guess: torch.Tensor) -> float:
    """Mean squared error against the original, in [0, 1] pixels, over the removed patches only."""
    removed = r.removed.expand_as(r.original)
    return ((guess.expand_as(r.original) - r.original)[removed] ** 2).mean().item()


def own_patch_mean(model: MaskedAutoencoderViT, r: Reconstructions, cfg: TrainConfig) -> torch.Tensor:
    """Each patch replaced by its own mean: the norm-pix reconstruction of a model that predicts 0."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in display_stats(cfg.data))
    flat = model.reconstruct(r.inputs, torch.zeros_like(model.patchify(r.inputs)))
    return (flat * std + mean).clamp(0, 1)


def test_viz_draws_the_quickstart_models_reconstructions(quickstart: tuple[Registry, RunState], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    registry, state = quickstart
    out = tmp_path / "out.png"
    code, text = run_in_process(capsys, "viz", state.key, "--images", "4", "-o", str(out), "--root", registry.root)
    assert code == 0, text
    assert f"at step {state.step}" in text
    png = matplotlib.image.imread(str(out))
    width, height = figure_px(4)
    assert png.shape == (height, width, 4)  # 4 rows x 3 panels of PANEL_PX, with their padding and titles

    cfg = run_config(registry, state)
    r = reconstruct_run(cfg, 16)
    assert r.step == state.step and r.mask_ratio == cfg.model.mask_ratio
    # The figure shows these images: each panel's pixel centres hold the tensors' values.
    scale = PANEL_PX // cfg.data.input_size
    centres = torch.arange(cfg.data.input_size) * scale + scale // 2
    for row in range(4):
        for col, images in enumerate([r.masked, r.reconstruction, r.original]):
            top, left = TITLE_PX + row * (PANEL_PX + PAD_PX), PAD_PX + col * (PANEL_PX + PAD_PX)
            shown = torch.from_numpy(png[top + centres][:, left + centres, :3].copy()).permute(2, 0, 1)
            torch.testing.assert_close(shown, images[row], atol=1 / 255 + 1e-6, rtol=0)

    # Baselines, on the removed patches of the first 16 images:
    # - the mean colour of the image's visible patches: what a viewer would guess;
    # - each removed patch flat at its own true mean. This is the honest, stronger one: with
    #   norm_pix_loss the reconstruction is de-normalised with the target patch's own mean and
    #   variance, so it gets each patch's mean for free, and a model predicting 0 scores this.
    #   A model that learned anything must add structure on top of it.
    model, _ = load_model(cfg)
    visible = ~r.removed
    visible_mean = (r.original * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)
    flat = own_patch_mean(model, r, cfg)
    trained = masked_mse(r, r.reconstruction)
    print(f"masked-patch MSE: model {trained:.5f}, visible mean colour {masked_mse(r, visible_mean):.5f}, "
          f"own patch mean {masked_mse(r, flat):.5f}")
    assert trained < masked_mse(r, visible_mean)
    assert trained < masked_mse(r, flat)
    # The baseline can be lost to: the same model untrained does not beat it.
    seed_everything(cfg.seed)
    untrained = reconstruct(make_model(cfg).eval(), r.inputs, r.mask_ratio, 0, *display_stats(cfg.data))
    assert torch.equal(untrained.mask, r.mask)
    assert masked_mse(untrained, untrained.reconstruction) > masked_mse(r, flat)


def test_viz_refuses_bad_options_in_one_line(quickstart: tuple[Registry, RunState], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    registry, state = quickstart
    out = str(tmp_path / "x.png")

    def refused(*args: str) -> str:
        code, text = run_in_process(capsys, "viz", *args, "-o", out, "--root", registry.root)
        assert code == 2, text
        lines = text.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in text, text
        return lines[0]

    assert "--images 0" in refused(state.key, "--images", "0")
    assert "--mask-ratio 1.5" in refused(state.key, "--mask-ratio", "1.5")
    assert "--mask-ratio 0.99" in refused(state.key, "--mask-ratio", "0.99")  # no patch of 64 stays visible
    line = refused(state.key, "--step", "7")
    assert "--step 7" in line and f"available steps: {state.step - 16}, {state.step}" in line  # keep_last: 2
    assert "--images 3000" in refused(state.key, "--images", "3000")  # the demo set holds 2048
    # A run that has not saved yet.
    spec = load_spec(write_small_spec(tmp_path))
    [run] = expand(spec)
    assert registry.create(run, load_profile(spec.cluster), total_steps=16)
    assert "no complete checkpoint yet" in refused(f"{run.experiment}/{run.run_id}")
    assert not Path(out).exists()


def test_reconstructs_a_checkpoint_saved_by_two_ranks_in_one_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, "two", str(tmp_path / "two"))  # tests/trainer_runs.TINY: synthetic data
    proc = launch(config, nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = TrainConfig.from_yaml(config)
    info = find_checkpoint(cfg)
    assert info.step == 8 and info.world_size == 2
    assert {p.name for p in Path(info.url).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # one shard each

    model, used = load_model(cfg)
    assert used == info
    saved = checkpoint_state(config)  # the same checkpoint read the trainer's way, with its optimizer
    weights = model.state_dict()
    assert {f"model.{k}" for k in weights} == {k for k in saved if k.startswith("model.")}
    for k, v in weights.items():
        assert torch.equal(v, saved[f"model.{k}"]), k
    seed_everything(cfg.seed)
    initial = make_model(cfg).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in weights.items())  # trained, so the check means something

    r = reconstruct_run(cfg, 4, seed=1)
    assert r.step == 8
    for images in (r.masked, r.reconstruction, r.prediction, r.original):
        assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert r.mask.shape == (4, 64) and r.removed.shape == (4, 1, 32, 32)
    assert r.mask.sum(1).tolist() == [64 - num_visible(64, cfg.model.mask_ratio)] * 4
    # The run's own first images: its seeded synthetic set, in order.
    assert torch.equal(r.inputs, synthetic_images(256, 32, cfg.seed)[:4])
    again = reconstruct(model, r.inputs, r.mask_ratio, 1, *display_stats(cfg.data))
    assert torch.equal(again.mask, r.mask) and torch.equal(again.reconstruction, r.reconstruction)
    other = reconstruct(model, r.inputs, r.mask_ratio, 2, *display_stats(cfg.data))
    assert not torch.equal(other.mask, r.mask)  # the seed chooses the masks


class Oracle(MaskedAutoencoderViT):
    """Predicts every patch exactly as its loss wants it: with norm_pix_loss, the patch normalised
    by its own mean and variance (computed here, not by the model); otherwise its pixels."""

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.sample_mask(imgs.shape[0], mask_ratio, generator)
        patches = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            patches = (patches - mean) / (var + 1.0e-6) ** 0.5
        return torch.zeros(()), patches, mask.mask


class Zero(MaskedAutoencoderViT):
    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = self.sample_mask(imgs.shape[0], mask_ratio, generator)
        return torch.zeros(()), torch.zeros_like(self.patchify(imgs)), mask.mask


def small(cls: type[MaskedAutoencoderViT], **kw: object) -> MaskedAutoencoderViT:
    return cls(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2, **kw)  # type: ignore[arg-type]


def patchy_images(n: int = 3) -> torch.Tensor:
    """[0, 1] images whose 4x4 patches differ in brightness and contrast, normalised like training."""
    g = torch.Generator().manual_seed(0)
    offset = (0.25 + 0.5 * torch.rand(n, 3, 8, 8, generator=g)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    contrast = (0.2 * torch.rand(n, 1, 8, 8, generator=g)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    pixels = offset + contrast * (2 * torch.rand(n, 3, 32, 32, generator=g) - 1)
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_reconstructs_the_original(norm_pix_loss: bool) -> None:
    """With norm-pix, predictions are de-normalised with the target patch's own mean and variance."""
    model = small(Oracle, norm_pix_loss=norm_pix_loss).eval()
    imgs = patchy_images()
    r = reconstruct(model, imgs, 0.75, 0, MEAN, STD)
    assert r.removed.float().mean().item() == pytest.approx(0.75)
    torch.testing.assert_close(r.reconstruction, r.original, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.prediction, r.original, atol=1e-5, rtol=0)
    if norm_pix_loss:  # taken as pixels, the normalised prediction is far off: the images test something
        _, pred, _ = model(imgs, 0.75, torch.Generator().manual_seed(0))
        raw = (model.unpatchify(pred) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1))
        assert (raw.clamp(0, 1) - r.original).abs().max() > 0.3


def test_norm_pix_zero_prediction_is_each_patchs_own_mean_and_panels_are_pasted() -> None:
    model = small(Zero, norm_pix_loss=True).eval()
    imgs = patchy_images()
    r = reconstruct(model, imgs, 0.75, 0, MEAN, STD)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    patch_means = imgs.unfold(2, 4, 4).unfold(3, 4, 4).mean((1, 4, 5), keepdim=True)  # (N, 1, 8, 8, 1, 1)
    flat = patch_means.squeeze(-1).squeeze(-1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    torch.testing.assert_close(r.prediction, (flat * std + mean).clamp(0, 1), atol=1e-5, rtol=0)
    removed = r.removed.expand_as(r.original)
    # Visible patches are the original's, exactly; removed ones the model's, in every panel.
    assert torch.equal(r.reconstruction[~removed], r.original[~removed])
    assert torch.equal(r.reconstruction[removed], r.prediction[removed])
    assert torch.equal(r.masked[~removed], r.original[~removed])
    grey = mean.clamp(0, 1).expand_as(r.masked)
    torch.testing.assert_close(r.masked[removed], grey[removed])  # removed: the dataset mean colour
    # The removed pixels are exactly the patches the mask removes.
    torch.testing.assert_close(r.removed.float(), r.mask.view(-1, 1, 8, 8).repeat_interleave(4, 2)
                               .repeat_interleave(4, 3))


def test_mask_ratio_the_model_cannot_use_is_refused() -> None:
    imgs = patchy_images(2)
    grid = small(Zero, mask_strategy="grid").eval()
    with pytest.raises(ReconstructionError, match="grid") as e:
        reconstruct(grid, imgs, 0.5, 0, MEAN, STD)
    assert e.value.option == "mask_ratio"
    r = reconstruct(grid, imgs, 0.75, 0, MEAN, STD)
    assert r.mask[0].view(8, 8)[::2, ::2].sum() == 0 and r.mask.sum() == 2 * 48  # one patch per 2x2 cell kept
    with pytest.raises(ReconstructionError, match="visible"):
        reconstruct(small(Zero).eval(), imgs, 0.99, 0, MEAN, STD)  # int(64 * 0.01) = 0 patches visible


def test_first_images_are_the_datasets_first_centre_crops(tmp_path: Path) -> None:
    build_demo(str(tmp_path / "demo"), 40, (60, 40), shard_bytes=30_000)  # several shards, wide photos
    assert len(list((tmp_path / "demo").glob("*.tar"))) > 1
    cfg = TrainConfig(data={"url": str(tmp_path / "demo"), "input_size": 32})
    ten = first_images(cfg.data, 10, 0)
    # The samples in the order they were written, each as its centred 40x40 square resized to 32.
    written = [data for _, _, data in demo_samples(40, (60, 40))][:10]
    squares = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")
                          .resize((32, 32), Image.Resampling.BICUBIC, box=(10, 0, 50, 40))) for d in written]
    torch.testing.assert_close(ten, normalise(np.stack(squares)))
