"""The figures: each function draws what it is given and saves a PNG (or GIF) atomically.

    save_triptych       Ground Truth / Noisy Input / Inference Output
    save_trajectory     multi-step denoising: x and x0_hat at each step
    save_trajectory_gif the same as an animation
    save_sweep          noisy input and outputs across noise levels, and PSNR against w
    save_loss_curve     training loss against step
    save_loss_by_noise  training loss against noise level w, binned
    save_quality_curve  PSNR during training against wall time
    save_image_grid     samples in a grid
    save_nearest_pairs  samples beside their nearest training images
    save_generalization_grid    two models' samples from the same noise, beside their nearest training digits
    save_generalization_curves  the generalisation experiment against N
    save_guidance_grid          a conditional model's samples, a row per class, a column per guidance scale
    save_guidance_curves        fidelity against diversity: accuracy, FLD, precision and recall against S

Nothing here computes a metric or runs the model. Matplotlib is used through
its object API (Figure + the Agg canvas), so no window or global state is
involved.
"""

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import make_grid

from .files import atomic_write
from .imaging import to_pil

FIGURE_WIDTH_PX = 1500
DPI = 100
MAX_TRAJECTORY_COLUMNS = 10
GRID_PADDING = 4  # px of white between the images that make_grid lays side by side


def _new_figure(width_in, height_in):
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


PNG_COMPRESS_LEVEL = 3  # zlib level: half the time of PIL's default 6, files a few per cent larger


def _save(fig, path):
    """Render and write an opaque RGB PNG (matplotlib's own savefig writes RGBA: a third more to encode)."""
    canvas = fig.canvas
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8; the figure has no transparency
    with atomic_write(path, "figure") as tmp:
        Image.fromarray(rgb).save(tmp, format="png", compress_level=PNG_COMPRESS_LEVEL)


def _show(ax, image, title=None, fontsize=12):
    ax.imshow(to_pil(image))
    if title:
        ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def save_triptych(panels, path):
    """Images side by side with titles (of up to two lines), FIGURE_WIDTH_PX wide.

    panels: list of (title, image tensor in [-1, 1]).
    """
    count = len(panels)
    width = FIGURE_WIDTH_PX / DPI  # inches
    gap, title_space = 0.01, 0.7  # gap: fraction of the width; title_space: inches
    panel = width * (1 - gap * (count + 1)) / count  # each square panel's side, inches
    height = panel + title_space + 0.1
    fig = _new_figure(width, height)
    for i, (title, image) in enumerate(panels):
        left = gap + i * (panel / width + gap)
        _show(fig.add_axes((left, 0.1 / height, panel / width, panel / height)), image, title, fontsize=14)
    _save(fig, path)


def pick_steps(count, most=MAX_TRAJECTORY_COLUMNS):
    """Indices of at most ``most`` steps out of ``count``, evenly spread, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def save_trajectory(trajectory, path):
    """Multi-step denoising, one column per step: the current x on top, the model's x0_hat below.

    trajectory: list of (t, w, x, x0_hat) as denoise() records it. Long runs
    show MAX_TRAJECTORY_COLUMNS evenly spread steps, first and last included.
    """
    chosen = pick_steps(len(trajectory))
    columns = len(chosen)
    fig = _new_figure(FIGURE_WIDTH_PX / DPI, 2 * FIGURE_WIDTH_PX / DPI / max(columns, 4) + 1.2)
    axes = fig.subplots(2, columns, squeeze=False)
    for col, index in enumerate(chosen):
        t, w, x, x0_hat = trajectory[index]
        _show(axes[0, col], x, f"step {index + 1}/{len(trajectory)}\nt={t}, w={w:.2f}", fontsize=10)
        _show(axes[1, col], x0_hat)
    axes[0, 0].text(-0.08, 0.5, "x (input)", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.08, 0.5, "x0_hat (prediction)", transform=axes[1, 0].transAxes, rotation=90,
                    va="center", ha="right")
    shown = "" if columns == len(trajectory) else f" ({columns} of {len(trajectory)} steps shown)"
    fig.suptitle(f"Multi-step denoising{shown}: each step predicts x0, then re-noises it to the next lower t",
                 fontsize=13)
    fig.tight_layout(rect=(0.02, 0, 1, 0.97))
    _save(fig, path)


def save_trajectory_gif(trajectory, path, frame_ms=250, most_frames=25):
    """An animated GIF: x and x0_hat side by side, one frame per step; the last frame lingers.

    Long runs show ``most_frames`` evenly spread steps, first and last included,
    which keeps the file a few megabytes.
    """
    frames = []
    for index in pick_steps(len(trajectory), most_frames):
        t, w, x, x0_hat = trajectory[index]
        pair = make_grid(torch.cat([x, x0_hat]), nrow=2, padding=GRID_PADDING, pad_value=1.0)  # (3, H, 2W + pads)
        fig = _new_figure(5.2, 3.0)
        _show(fig.add_axes((0.02, 0.02, 0.96, 0.8)), pair,
              f"step {index + 1}/{len(trajectory)}, t={t}, w={w:.2f}\nleft: x (input)   right: x0_hat (prediction)",
              fontsize=10)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        frames.append(Image.fromarray(rgba[:, :, :3].copy()))
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 8]
    with atomic_write(path, "figure") as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_sweep(columns, curves, max_noise, path):
    """Noise-level sweep: image columns on top, PSNR against w below.

    columns: list of (title, noisy input, one-step output) for a few noise levels.
    curves:  dict label -> (list of w, list of PSNR in dB).
    Noise levels above max_noise, which the model never saw in training, are shaded.
    """
    count = len(columns)
    width = FIGURE_WIDTH_PX / DPI
    cell = width / count
    fig = _new_figure(width, 2 * cell + 4.6)
    grid = fig.add_gridspec(3, count, height_ratios=[cell, cell, 4.0])
    for col, (title, noisy, output) in enumerate(columns):
        _show(fig.add_subplot(grid[0, col]), noisy, title, fontsize=8)
        _show(fig.add_subplot(grid[1, col]), output)
    fig.axes[0].text(-0.1, 0.5, "noisy input", transform=fig.axes[0].transAxes, rotation=90, va="center",
                     ha="right", fontsize=9)
    fig.axes[1].text(-0.1, 0.5, "1-step output", transform=fig.axes[1].transAxes, rotation=90, va="center",
                     ha="right", fontsize=9)

    plot = fig.add_subplot(grid[2, :])
    for label, (ws, values) in curves.items():
        plot.plot(ws, values, marker="o", label=label)
    if max_noise < 1:
        plot.axvspan(max_noise, 1.0, color="grey", alpha=0.2,
                     label=f"never seen in training (w > max_noise = {max_noise:g})")
    plot.set_xlim(0, 1)
    plot.set_xlabel("noise weight w  (x_t = (1 - w) x0 + w eps)")
    plot.set_ylabel("PSNR against ground truth (dB)")
    plot.grid(alpha=0.3)
    plot.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=4, frameon=False)  # below the axes
    fig.tight_layout()
    _save(fig, path)


def save_loss_curve(losses, path, smoothing=50):
    """Training loss against step, raw and as a moving average, on a log scale."""
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(losses) + 1)
    fig = _new_figure(10, 5)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
    if len(losses) >= smoothing:
        smooth = np.convolve(losses, np.ones(smoothing) / smoothing, mode="valid")
        ax.plot(steps[smoothing - 1:], smooth, color="tab:blue", linewidth=2,
                label=f"mean of the last {smoothing} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss (log scale)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def save_quality_curve(quality, milestones, path):
    """PSNR of the one-step output during training against wall time, with the run's milestones marked.

    quality: {"t", "step", "seconds", "psnr_db"} as ddpm_train.py logs it;
    milestones: (dB, step, seconds) of the first check that reached each level.
    """
    fig = _new_figure(10, 5)
    ax = fig.add_subplot()
    ax.plot(quality["seconds"], quality["psnr_db"], color="tab:green", marker="o", markersize=3, linewidth=1.5,
            label=f"one-step output at t = {quality['t']}")
    for db, step, seconds in milestones:
        ax.axhline(db, color="gray", linewidth=0.8, linestyle="--")
        ax.annotate(f"{db:g} dB: step {step}, {seconds:.0f} s", (seconds, db), xytext=(8, -14),
                    textcoords="offset points", fontsize=9)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("PSNR against the image (dB)")
    ax.set_title("Quality during training")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def save_loss_by_noise(ws, losses, max_noise, path, bins=16, parts=3):
    """Mean training loss in bins of the noise weight w: which noise levels are hard.

    ws, losses: the noise weight and loss of one image per step. Training is
    cut into ``parts`` equal spans of steps, one line each, so the plot shows
    how the difficulty of each noise level changes as the model learns.
    """
    ws, losses = np.asarray(ws, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    edges = np.linspace(0, max_noise, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = _new_figure(10, 5)
    ax = fig.add_subplot()
    bounds = np.linspace(0, len(ws), parts + 1).round().astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        which = np.clip(np.digitize(ws[start:stop], edges) - 1, 0, bins - 1)
        part = losses[start:stop]
        means = [part[which == b].mean() if np.any(which == b) else np.nan for b in range(bins)]
        ax.plot(centres, means, marker="o", label=f"steps {start + 1} to {stop}")
    ax.set_yscale("log")
    ax.set_xlabel("noise weight w of the training input")
    ax.set_ylabel("mean MSE loss in the bin (log scale)")
    ax.set_title("Training loss by noise level")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def save_image_grid(images, path, columns=8, min_tile_px=64):
    """Images (K, 3, H, W) in [-1, 1] as one PNG grid, ``columns`` wide, each enlarged (pixels kept
    sharp) to at least ``min_tile_px`` so that small samples can be seen."""
    grid = make_grid(images.detach().float().cpu(), nrow=min(columns, len(images)), padding=1, pad_value=1.0)
    scale = max(1, -(-min_tile_px // images.shape[-1]))  # ceil
    picture = to_pil(grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_write(path, "figure") as tmp:
        picture.save(tmp, format="png", compress_level=PNG_COMPRESS_LEVEL)


def save_nearest_pairs(pairs, path, title, columns=4):
    """Each sample beside its nearest training image, captioned with d1/d2.

    pairs: list of (sample (3, H, W), nearest training image (3, H, W), caption), at most a few dozen.
    """
    rows = -(-len(pairs) // columns)
    header_in, row_in = 0.5, 1.5  # inches: the title, then one row of pairs with its caption
    height = header_in + rows * row_in
    fig = _new_figure(2.4 * columns, height)
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
    for index, (sample, nearest, caption) in enumerate(pairs):
        row, column = divmod(index, columns)
        bottom = (height - header_in - (row + 1) * row_in) / height
        ax = fig.add_axes((column / columns + 0.01, bottom, 1 / columns - 0.02, 0.8 * row_in / height))
        pair = make_grid(torch.stack([sample, nearest]).float().cpu(), nrow=2, padding=1, pad_value=1.0)
        _show(ax, pair)
        ax.set_title(caption, fontsize=8)
    _save(fig, path)


def save_generalization_grid(rows, path):
    """The Kadkhodaie et al. figure: for each N, a few starting noises, each shown as four images:
    the S1 image nearest to model A's sample, A's sample, B's sample, the S2 image nearest to B's.

    rows: list of (N, [(nearest S1, A, B, nearest S2), ...]), images (3, H, W) in [-1, 1].
    """
    per_row = len(rows[0][1])
    header_in, row_in = 0.45, 0.62 * per_row / 4 + 0.35
    height = header_in + len(rows) * row_in
    fig = _new_figure(1.4 + 2.0 * per_row, height)
    fig.suptitle("from the same noise: nearest S1 digit | model A (trained on S1) | model B (trained on S2) | "
                 "nearest S2 digit", fontsize=10, y=1 - 0.15 / height)
    for index, (n, quads) in enumerate(rows):
        bottom = (height - header_in - (index + 1) * row_in) / height
        ax = fig.add_axes((0.11, bottom, 0.88, 0.9 * row_in / height))
        tiles = torch.stack([image for quad in quads for image in quad]).float().cpu()
        _show(ax, make_grid(tiles, nrow=len(tiles), padding=1, pad_value=1.0))
        for k in range(1, per_row):  # a wider gap between one noise's four images and the next
            ax.axvline(k * 4 * (tiles.shape[-1] + 1), color="white", linewidth=4)
        ax.text(-0.01, 0.5, f"N = {n:,}", transform=ax.transAxes, ha="right", va="center", fontsize=10)
    _save(fig, path)


def save_generalization_curves(rows, path):
    """The generalisation experiment against N: copies; how alike the two models' samples are and how
    alike each is to its nearest training digit; and the FLD against held-out digits.

    rows: the experiment's records (a dict per N, as in images/generalization.json).
    """
    fig = _new_figure(15, 4.2)
    n = [row["num_images"] for row in rows]
    ax = fig.add_axes((0.05, 0.14, 0.27, 0.74))
    for model, style in (("A", "o-"), ("B", "s--")):
        ax.plot(n, [100 * row[model]["memorized_fraction"] for row in rows], style, label=f"model {model}")
    ax.set(xscale="log", xlabel="training digits N (each model)", ylabel="samples memorised (%)", ylim=(-3, 103),
           title="copies of a training digit (d1/d2 < 1/3)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)

    ax = fig.add_axes((0.38, 0.14, 0.27, 0.74))
    ax.plot(n, [row["median_cosine_a_b"] for row in rows], "o-", color="tab:green", label="A's sample vs B's")
    for model, style in (("A", "^:"), ("B", "v:")):
        ax.plot(n, [row[model]["median_nearest_cosine"] for row in rows], style,
                label=f"{model}'s sample vs its nearest training digit")
    ax.set(xscale="log", xlabel="training digits N (each model)", ylabel="median cosine similarity",
           title="same noise, disjoint data: who agrees with whom", ylim=(0, 1.02))
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)

    ax = fig.add_axes((0.71, 0.14, 0.27, 0.74))
    for model, style in (("A", "o-"), ("B", "s--")):
        ax.plot(n, [row[model]["fld"] for row in rows], style, label=f"model {model}")
    ax.plot(n, [row["A"]["real_fld"] for row in rows], ":", color="gray", label="real digits never trained on")
    ax.set(xscale="log", yscale="log", xlabel="training digits N (each model)",
           ylabel="FLD against held-out digits", title="how far from real digits (lower is better)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def save_guidance_grid(classes, scales, cells, path):
    """Classifier-free guidance at a glance: a row per class, a block of samples per guidance scale S.

    cells[c][j]: (k, 3, H, W) samples asked for class c at scale scales[j], in [-1, 1]; the same k starting
    noises in every block of a row, so a row shows what S does to the same noises.
    """
    per_cell = len(cells[0][0])
    header_in, row_in = 0.55, 0.42 * per_cell / 4 + 0.25
    height = header_in + len(classes) * row_in
    fig = _new_figure(1.0 + 1.9 * len(scales) * per_cell / 4, height)
    fig.suptitle("asked for each class (rows) at guidance scale S (columns): "
                 "x0_uncond + S * (x0_cond - x0_uncond)", fontsize=10, y=1 - 0.12 / height)
    for row, name in enumerate(classes):
        bottom = (height - header_in - (row + 1) * row_in) / height
        ax = fig.add_axes((0.06, bottom, 0.93, 0.92 * row_in / height))
        tiles = torch.cat([cells[row][j] for j in range(len(scales))]).float().cpu()
        _show(ax, make_grid(tiles, nrow=len(tiles), padding=1, pad_value=1.0))
        tile = tiles.shape[-1] + 1
        for j in range(1, len(scales)):  # a wider gap between one scale's block and the next
            ax.axvline(j * per_cell * tile, color="white", linewidth=5)
        if row == 0:
            for j, scale in enumerate(scales):
                ax.text((j + 0.5) / len(scales), 1.08, f"S = {scale:g}", transform=ax.transAxes, ha="center",
                        va="bottom", fontsize=10)
        ax.text(-0.01, 0.5, name, transform=ax.transAxes, ha="right", va="center", fontsize=11)
    _save(fig, path)


def save_guidance_curves(rows, judge_accuracy, path):
    """The guidance sweep against S: how often the judge reads the asked-for class (fidelity), and the FLD,
    precision and recall against held-out digits (quality and diversity), each beside real digits.

    rows: the sweep's records (a dict per S, as in images/guidance.json); judge_accuracy: the judge's own
    accuracy on held-out real digits, the most a perfect generator could score.
    """
    fig = _new_figure(15, 4.2)
    s = [row["guidance"] for row in rows]
    ax = fig.add_axes((0.05, 0.14, 0.27, 0.74))
    ax.plot(s, [100 * row["accuracy"] for row in rows], "o-", color="tab:blue", label="samples")
    ax.axhline(100 * judge_accuracy, linestyle=":", color="gray", label="real held-out digits")
    ax.set(xlabel="guidance scale S", ylabel="judged as the asked-for digit (%)",
           title="fidelity: does it draw what was asked?")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)

    ax = fig.add_axes((0.38, 0.14, 0.27, 0.74))
    ax.plot(s, [row["fld"] for row in rows], "o-", color="tab:red", label="samples")
    ax.plot(s, [row["real_fld"] for row in rows], ":", color="gray", label="real digits never trained on")
    ax.set(yscale="log", xlabel="guidance scale S", ylabel="FLD against held-out digits",
           title="how far from real digits (lower is better)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, which="both")

    ax = fig.add_axes((0.71, 0.14, 0.27, 0.74))
    ax.plot(s, [row["precision"] for row in rows], "o-", color="tab:green", label="precision (each sample real-like)")
    ax.plot(s, [row["recall"] for row in rows], "s--", color="tab:purple", label="recall (real variety covered)")
    ax.plot(s, [row["real_recall"] for row in rows], ":", color="gray", label="recall of real digits")
    ax.set(xlabel="guidance scale S", ylabel="share", ylim=(0, 1.02), title="quality against variety")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)
