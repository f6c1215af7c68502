"""``nnunet-stseg overlay``: quality-control pictures of any prediction folder.

One PNG per case: for a 2D image the image itself, for a 3D volume the slice with the largest
predicted area (the middle slice when nothing is predicted) next to a coronal maximum-intensity
strip (the whole volume at a glance, with the predicted outline projected onto it and the shown
slice marked). The prediction's outline is drawn in red, the ground truth's (``-l``) in green,
and the boxes of ``<case>.objects.json`` (what the cascade found: the object's tight box in
yellow, the crop the fine network saw dashed, the polar stage's origins as crosses) where the
prediction folder has them. Plus ``index.html`` (every case, its object count, its picture) and
``index.png`` (a contact sheet of the first ``--sheet`` cases). Works on any nnU-Net prediction
folder, also without our JSON.

    nnunet-stseg overlay -i imagesTs -p pred -o qa/ [-l labelsTs]
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_stseg.adapters.inference_io import OBJECTS_SUFFIX
from nnunet_stseg.atomic import write_atomic


def display_image(img: np.ndarray) -> np.ndarray:
    """Greyscale scaled to the 1st-99th percentile for display; RGB (H, W, 3) uint8 unchanged."""
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        return img
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0, 1)


def read_image(path: Path) -> np.ndarray:
    """An image or label file as an array: PNG (scikit-image) or anything SimpleITK reads."""
    if path.suffix == ".png":
        from skimage.io import imread

        return np.asarray(imread(str(path)))
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp")


def prediction_cases(pred_dir: Path, file_ending: str | None = None) -> tuple[list[str], str]:
    """The cases of a prediction folder and their file ending (from the ``dataset.json`` nnU-Net
    writes next to its predictions, else ``file_ending``, else the most common known ending)."""
    if file_ending is None and (pred_dir / "dataset.json").is_file():
        file_ending = json.loads((pred_dir / "dataset.json").read_text()).get("file_ending")
    if file_ending is None:
        counts = {e: len(list(pred_dir.glob(f"*{e}"))) for e in ENDINGS}
        file_ending = max(counts, key=counts.get)
        if counts[file_ending] == 0:
            raise FileNotFoundError(f"{pred_dir}: no predictions ({', '.join(ENDINGS)})")
    cases = sorted(f.name[:-len(file_ending)] for f in pred_dir.glob(f"*{file_ending}") if not f.name.startswith("."))
    if not cases:
        raise FileNotFoundError(f"{pred_dir}: no *{file_ending} predictions")
    return cases, file_ending


def _as_volume(arr: np.ndarray) -> np.ndarray:
    """(Z, Y, X) for 3D arrays, (1, Y, X) for 2D greyscale, (1, Y, X, 3) for 2D colour."""
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4):
        return arr[None]
    return arr


def shown_slice(pred: np.ndarray) -> int:
    """Index of the slice with the largest predicted area (the middle one when nothing is predicted).

    >>> p = np.zeros((4, 3, 3), np.uint8); p[2, :2, :2] = 1
    >>> shown_slice(p), shown_slice(np.zeros((5, 2, 2)))
    (2, 2)
    """
    area = (pred > 0).reshape(len(pred), -1).sum(1)
    return int(np.argmax(area)) if area.any() else len(pred) // 2


def _draw_boxes(ax, objects: list[dict], z: int | None, axes_yx: tuple[int, int]) -> int:
    """Rectangles of the objects (tight box solid, crop box dashed) and their origins (polar stage:
    crosses) whose box holds slice ``z`` (all of them when ``z`` is None), on the plot axes
    ``axes_yx`` of the (z, y, x) box."""
    from matplotlib.patches import Rectangle

    shown = 0
    ay, ax_ = axes_yx
    for obj in objects:
        for key, style in (("box", "-"), ("crop_box", "--")):
            if key not in obj:
                continue
            start, stop = obj[key]["start"], obj[key]["stop"]
            if z is not None and not start[0] <= z < stop[0]:
                continue
            ax.add_patch(Rectangle((start[ax_] - 0.5, start[ay] - 0.5), stop[ax_] - start[ax_], stop[ay] - start[ay],
                                   fill=False, edgecolor="yellow", linestyle=style, linewidth=0.9))
            shown += key == "box"
        for origin in obj.get("origins", []):
            point = origin["index"]
            if z is None or round(point[0]) == z:
                ax.plot(point[ax_], point[ay], "+", color="yellow", markersize=6, markeredgewidth=1.0)
    return shown


def case_picture(image: np.ndarray, pred: np.ndarray, path: Path, title: str, gt: np.ndarray | None = None,
                 objects: list[dict] | None = None, dpi: int = 90) -> Path:
    """The QA picture of one case (see the module docstring), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, pred = _as_volume(image), _as_volume(pred)
    gt = _as_volume(gt) if gt is not None else None
    z = shown_slice(pred)
    is_3d = pred.shape[0] > 1
    fig, axes = plt.subplots(1, 2 if is_3d else 1, figsize=(9 if is_3d else 4.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(display_image(image[z]), cmap="gray" if image[z].ndim == 2 else None)
    for mask, colour in ((gt, "lime"), (pred, "red")):
        if mask is not None and (mask[z] > 0).any():
            ax.contour(mask[z] > 0, levels=[0.5], colors=colour, linewidths=0.8)
    n_boxes = _draw_boxes(ax, objects or [], z, (1, 2))
    ax.set_title(f"{title}" + (f"  slice {z}/{pred.shape[0]}" if is_3d else "")
                 + (f"  {n_boxes} object(s)" if objects is not None else ""), fontsize=8)
    ax.axis("off")
    if is_3d:
        strip = axes[0, 1]
        strip.imshow(display_image(image.max(axis=1)), cmap="gray", aspect="auto")
        projected = (pred > 0).any(axis=1)
        if projected.any():
            strip.contour(projected, levels=[0.5], colors="red", linewidths=0.8)
        strip.axhline(z, color="cyan", linewidth=0.6)
        for obj in objects or []:
            _draw_boxes(strip, [obj], None, (0, 2))
        strip.set_title("coronal maximum-intensity strip (cyan: the slice shown)", fontsize=8)
        strip.axis("off")
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=dpi)
    plt.close(fig)
    return path


def contact_sheet(pictures: Sequence[Path], path: Path, columns: int = 4) -> Path:
    """The pictures side by side, ``columns`` per row, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.io import imread

    rows = -(-len(pictures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax, pic in zip(axes.flat, list(pictures) + [None] * (rows * columns - len(pictures))):
        if pic is not None:
            ax.imshow(imread(str(pic)))
        ax.axis("off")
    fig.tight_layout()
    write_atomic(path, figure=fig, dpi=80)
    plt.close(fig)
    return path


def overlay_folder(images: Path, pred_dir: Path, out: Path, labels: Path | None = None, channel: int = 0,
                   file_ending: str | None = None, sheet: int = 24, progress: bool = True) -> list[Path]:
    """Every case of ``pred_dir`` (see the module docstring); returns the per-case PNGs."""
    from tqdm import tqdm

    cases, ending = prediction_cases(pred_dir, file_ending)
    out.mkdir(parents=True, exist_ok=True)
    pictures, rows = [], []
    for case in tqdm(cases, desc="overlay", disable=not progress):
        image_file = images / f"{case}_{channel:04d}{ending}"
        if not image_file.is_file():
            raise FileNotFoundError(f"{image_file}: the image of prediction {pred_dir / (case + ending)} is missing "
                                    f"(-i must be the folder the prediction was made from)")
        report_file = pred_dir / f"{case}{OBJECTS_SUFFIX}"
        objects = json.loads(report_file.read_text())["objects"] if report_file.is_file() else None
        gt = read_image(labels / f"{case}{ending}") if labels is not None else None
        pic = case_picture(read_image(image_file), read_image(pred_dir / f"{case}{ending}"), out / f"{case}.png",
                           case, gt, objects)
        pictures.append(pic)
        rows.append(f"<tr><td>{html.escape(case)}</td><td>{'-' if objects is None else len(objects)}</td>"
                    f"<td><a href=\"{html.escape(pic.name)}\"><img src=\"{html.escape(pic.name)}\" height=\"220\">"
                    f"</a></td></tr>")
    contact_sheet(pictures[:sheet], out / "index.png")
    write_atomic(out / "index.html", "<!doctype html><meta charset=\"utf-8\"><title>nnunet-stseg overlay</title>"
                 f"<h3>{html.escape(str(pred_dir))}: {len(cases)} case(s)</h3>"
                 "<p>red: prediction; green: ground truth; yellow: objects found (dashed: the crop)</p>"
                 "<table><tr><th>case</th><th>objects</th><th>picture</th></tr>" + "".join(rows) + "</table>\n")
    return pictures


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnunet-stseg overlay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", dest="images", type=Path, required=True, help="the input images (nnU-Net's _0000 naming)")
    p.add_argument("-p", dest="predictions", type=Path, required=True, help="the prediction folder")
    p.add_argument("-o", dest="out", type=Path, required=True, help="where the PNGs and index.html go")
    p.add_argument("-l", dest="labels", type=Path, default=None, help="ground truth folder (optional)")
    p.add_argument("--channel", type=int, default=0, help="image channel to show (0)")
    p.add_argument("--file_ending", default=None, help="default: from the prediction folder's dataset.json")
    p.add_argument("--sheet", type=int, default=24, help="cases on the contact sheet index.png (24)")
    args = p.parse_args(argv)
    try:
        pictures = overlay_folder(args.images, args.predictions, args.out, args.labels, args.channel,
                                  args.file_ending, args.sheet)
    except FileNotFoundError as e:
        p.exit(2, f"[nnunet-stseg] ERROR: {e}\n")
    print(f"{len(pictures)} picture(s), index: {args.out / 'index.html'}")


if __name__ == "__main__":
    main()
