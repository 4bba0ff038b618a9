"""`maestro viz`: a run's MAE reconstructions as a PNG in the style of the paper's Figure 2.

One row per image: the masked input, the reconstruction (visible patches pasted back from the
original) and the original. The numbers come from ``mae_core.reconstruct``; this module only
reads the run's spec from the registry, turns bad options into one-line errors and draws.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

from mae_core import storage
from orchestrator.errors import UserError
from orchestrator.registry import Registry, RunState

if TYPE_CHECKING:
    from mae_core.reconstruct import Reconstructions

TITLES = ("masked", "reconstruction + visible", "original")
# The figure's layout in pixels, so its size is exact: panels of PANEL_PX squared, PAD_PX apart
# and around, and a TITLE_PX band above the first row.
DPI = 100
PANEL_PX = 128
PAD_PX = 8
TITLE_PX = 32


def figure_px(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``rows`` images."""
    cols = len(TITLES)
    return cols * PANEL_PX + (cols + 1) * PAD_PX, TITLE_PX + rows * PANEL_PX + rows * PAD_PX + PAD_PX


def render_reconstructions(registry: Registry, state: RunState, output: str, step: int | None = None,
                           images: int = 8, mask_ratio: float | None = None, seed: int = 0) -> int:
    """Write the PNG to ``output`` (a path or any fsspec URL); returns the checkpoint step used."""
    if images < 1:
        raise UserError(f"--images {images}: give at least 1 image (the figure has one row per image)")
    if mask_ratio is not None and not 0.0 < mask_ratio < 1.0:
        raise UserError(f"--mask-ratio {mask_ratio} is not between 0 and 1 (exclusive); use e.g. 0.75, or leave it "
                        "out for the run's own")
    from mae_core.reconstruct import ReconstructionError, reconstruct_run  # torch: loaded only here

    cfg = registry.spec(state.experiment, state.run_id).train_config(
        output=registry.run_url(state.experiment, state.run_id))
    try:
        recon = reconstruct_run(cfg, images, step=step, mask_ratio=mask_ratio, seed=seed)
    except ReconstructionError as e:
        given = {"step": step, "mask_ratio": mask_ratio, "images": images}.get(e.option or "")
        flag = f"--{(e.option or '').replace('_', '-')} {given}" if given is not None else None
        # "mask_ratio 0.99 leaves ..." after "--mask-ratio 0.99:" would say the value twice.
        message = re.sub(rf"^{e.option} \S+ ", "", str(e)) if flag else str(e)
        message = message.replace("mask_ratio", "--mask-ratio")
        raise UserError(f"{state.key}: {flag}: {message}" if flag else f"{state.key}: {message}") from None
    storage.write_bytes(output, draw(recon, state.key))
    return recon.step


def draw(recon: Reconstructions, title: str) -> bytes:
    """The figure as PNG bytes: one row per image, columns as in TITLES."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's global backend
    from matplotlib.figure import Figure

    panels = [recon.masked, recon.reconstruction, recon.original]
    rows = panels[0].shape[0]
    width, height = figure_px(rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 3 / height, f"{title}: step {recon.step}, mask ratio {recon.mask_ratio:g}",
             ha="center", va="top", fontsize=6)
    for r in range(rows):
        for c, images in enumerate(panels):
            left = PAD_PX + c * (PANEL_PX + PAD_PX)
            top = TITLE_PX + r * (PANEL_PX + PAD_PX)
            ax = fig.add_axes((left / width, 1 - (top + PANEL_PX) / height, PANEL_PX / width, PANEL_PX / height))
            ax.imshow(images[r].permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(TITLES[c], fontsize=8, pad=2)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()
