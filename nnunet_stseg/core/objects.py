"""What the cascade found, in the coordinates of the input image: pure functions, no nnU-Net.

The cascade detects objects on nnU-Net's preprocessed grid: the input array transposed
(``transpose_forward``), cropped to its non-zero region (``bbox_used_for_cropping``) and
resampled to the configuration's spacing. A box there is mapped back in three steps, the inverse
of those: scale by ``shape_after_cropping_and_before_resampling / preprocessed shape``, shift by
the cropping box, undo the transposition (``transpose_backward``). The result is in voxel indices
of the array nnU-Net's reader returned for the input (SimpleITK and nibabel readers: ``(z, y,
x)``; natural images: ``(1, y, x)``), and then in world millimetres with the image's origin,
spacing and direction (the reader's frame: LPS for SimpleITK, RAS for nibabel).

Box edges are continuous voxel coordinates: voxel ``i`` spans ``[i, i + 1)`` in index space and
its centre is at ``i``, so an edge ``e`` is the point ``e - 0.5`` in centre coordinates. The
integer box reported to users is ``[floor(start), ceil(stop))``, the voxels the box touches.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_stseg.core.geometry import component_boxes

__all__ = ["boxes_to_input_index", "points_to_input_index", "index_to_world", "world_frame", "objects_at_origins",
           "objects_report"]


def boxes_to_input_index(boxes: np.ndarray, preprocessed_shape: Sequence[int], properties: dict,
                         transpose_backward: Sequence[int]) -> np.ndarray:
    """Boxes (N, 3, 2) ``[start, stop)`` on the preprocessed grid -> continuous boxes (N, 3, 2) in
    voxel indices of the reader's input array.

    >>> props = {"shape_after_cropping_and_before_resampling": (10, 40, 40),
    ...          "bbox_used_for_cropping": [[2, 12], [0, 40], [5, 45]]}
    >>> box = np.array([[[0, 5], [10, 20], [0, 20]]])  # on a (10, 20, 20) grid: in-plane resampled x 0.5
    >>> boxes_to_input_index(box, (10, 20, 20), props, [0, 1, 2])[0].tolist()
    [[2.0, 7.0], [20.0, 40.0], [5.0, 45.0]]
    >>> boxes_to_input_index(box, (10, 20, 20), props, [1, 2, 0])[0].tolist()  # slice axis was last
    [[20.0, 40.0], [5.0, 45.0], [2.0, 7.0]]
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 3, 2)
    before = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=float)
    scale = before / np.asarray(preprocessed_shape, dtype=float)
    offset = np.asarray([lo for lo, _ in properties["bbox_used_for_cropping"]], dtype=float)
    mapped = boxes * scale[None, :, None] + offset[None, :, None]
    return mapped[:, list(transpose_backward)]


def points_to_input_index(points: np.ndarray, preprocessed_shape: Sequence[int], properties: dict,
                          transpose_backward: Sequence[int]) -> np.ndarray:
    """Points (N, 3) in voxel-centre coordinates of the preprocessed grid -> voxel-centre
    coordinates (N, 3) of the reader's input array (a point is a zero-size box at ``p + 0.5``).

    >>> props = {"shape_after_cropping_and_before_resampling": (1, 40, 40),
    ...          "bbox_used_for_cropping": [[0, 1], [0, 40], [5, 45]]}
    >>> points_to_input_index(np.array([[0.0, 0.0, 9.5]]), (1, 20, 20), props, [0, 1, 2]).tolist()
    [[0.0, 0.5, 24.5]]
    """
    edges = np.asarray(points, dtype=float).reshape(-1, 3) + 0.5
    mapped = boxes_to_input_index(np.stack([edges, edges], axis=2), preprocessed_shape, properties,
                                  transpose_backward)
    return mapped[:, :, 0] - 0.5


def world_frame(properties: dict) -> str:
    """The frame :func:`index_to_world` reports in: ``LPS`` (SimpleITK readers), ``RAS`` (nibabel
    readers) or ``index x spacing`` (readers without orientation).

    >>> world_frame({"sitk_stuff": {}}), world_frame({"spacing": [1, 1, 1]})
    ('LPS', 'index x spacing')
    """
    if "sitk_stuff" in properties:
        return "LPS"
    if "nibabel_stuff" in properties:
        return "RAS"
    return "index x spacing"


def index_to_world(index: np.ndarray, properties: dict) -> np.ndarray:
    """Points (N, 3) in continuous voxel-centre coordinates of the reader's array (``(z, y, x)``)
    -> world millimetres (N, 3) in the frame :func:`world_frame` names, ``(x, y, z)`` order for
    LPS/RAS and array order otherwise.

    >>> props = {"sitk_stuff": {"spacing": (0.5, 0.5, 3.0), "origin": (10.0, 0.0, -5.0),
    ...                         "direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)}}
    >>> index_to_world(np.array([[2.0, 4.0, 6.0]]), props).tolist()  # z=2, y=4, x=6
    [[13.0, 2.0, -11.0]]
    """
    index = np.asarray(index, dtype=float).reshape(-1, 3)
    sitk_stuff = properties.get("sitk_stuff") or {}
    nib_stuff = properties.get("nibabel_stuff") or {}
    if "direction" in sitk_stuff and len(sitk_stuff["direction"]) == 9:
        ijk = index[:, ::-1]  # ITK order (x, y, z)
        direction = np.asarray(sitk_stuff["direction"], dtype=float).reshape(3, 3)
        spacing = np.asarray(sitk_stuff["spacing"], dtype=float)
        return np.asarray(sitk_stuff["origin"], dtype=float)[None] + (ijk * spacing[None]) @ direction.T
    affine = nib_stuff.get("reoriented_affine", nib_stuff.get("original_affine"))
    if affine is not None:
        affine = np.asarray(affine, dtype=float)
        ijk = index[:, ::-1]
        return ijk @ affine[:3, :3].T + affine[:3, 3][None]
    spacing = np.asarray(properties.get("spacing", (1.0, 1.0, 1.0)), dtype=float)
    return index * spacing[None]


def objects_at_origins(foreground: np.ndarray, probability: np.ndarray, origins: np.ndarray,
                       confidences: np.ndarray | None = None) -> dict:
    """What a stage that starts from points (the polar stage's origins) found: the components of
    its output ``foreground`` (Z, H, W), in-plane 8-connected per slice, that hold at least one
    origin (N, 3) ``(z, y, x)``. Returns ``tight`` boxes (M, 3, 2), ``voxels`` (M,),
    ``mean_probability`` (M,) of ``probability`` over each component, the ``origins`` of each
    (list of (k, 3)), ``n_origins_rejected`` (origins whose view left nothing there: the
    network rejected them) and ``n_components_without_origin`` (output components no origin
    lies in); with ``confidences`` (N,) also ``origin_confidences`` (list of (k,)).

    >>> fg = np.zeros((1, 8, 8), bool); fg[0, 1:3, 1:4] = True; fg[0, 6, 6] = True
    >>> found = objects_at_origins(fg, fg.astype(float), np.array([[0, 1.6, 2.2], [0, 5.0, 1.0]]))
    >>> found["tight"].tolist(), found["voxels"].tolist(), found["n_origins_rejected"]
    ([[[0, 1], [1, 3], [1, 4]]], [6], 1)
    >>> found["n_components_without_origin"]
    1
    """
    fg = np.asarray(foreground, dtype=bool)
    origins = np.asarray(origins, dtype=float).reshape(-1, 3)
    labels, boxes = component_boxes(fg, [False, True, True])  # components never connect across slices
    n = len(boxes)
    at = np.clip(np.rint(origins).astype(np.int64), 0, np.asarray(fg.shape) - 1)
    hit = labels[at[:, 0], at[:, 1], at[:, 2]] if len(at) else np.zeros(0, np.int64)
    ids = np.unique(hit[hit > 0])
    found = {"tight": boxes[ids - 1].reshape(-1, 3, 2), "voxels": np.bincount(labels.ravel(), minlength=n + 1)[ids],
             "mean_probability": np.asarray(ndimage.mean(probability, labels, ids)).reshape(-1),
             "origins": [origins[hit == i] for i in ids], "n_origins_rejected": int((hit == 0).sum()),
             "n_components_without_origin": int(n - len(ids))}
    if confidences is not None:
        c = np.asarray(confidences, dtype=float).reshape(-1)
        found["origin_confidences"] = [c[hit == i] for i in ids]
    return found


def _box_record(box: np.ndarray, properties: dict, frame: str) -> dict:
    """One continuous input-index box (3, 2) as voxels (integer ``[start, stop)``) and world mm."""
    start, stop = box[:, 0], box[:, 1]
    corners = index_to_world(np.stack([start - 0.5, stop - 0.5, (start + stop) / 2 - 0.5]), properties)
    return {"start": np.floor(start + 1e-6).astype(int).tolist(), "stop": np.ceil(stop - 1e-6).astype(int).tolist(),
            "world_mm": {"frame": frame, "start_corner": corners[0].round(3).tolist(),
                         "stop_corner": corners[1].round(3).tolist(), "centre": corners[2].round(3).tolist()}}


def objects_report(found: dict, preprocessed_shape: Sequence[int], properties: dict | None,
                   transpose_backward: Sequence[int], grid_spacing: Sequence[float]) -> dict:
    """The JSON-ready report of one case. ``found``: ``tight`` boxes (N, 3, 2) on the preprocessed
    grid, ``voxels`` (N,), ``mean_probability`` (N,), ``fallback``, and where the stage has them:
    ``crop`` boxes (N, 3, 2; the cascade), ``proposal`` (N strings: which rule proposed it),
    ``fine_confidence`` (N,: the fine stage's mean foreground probability over what it segments in
    the object's crop), ``rejected`` (N bools: proposals below the decision the fine stage rejected),
    ``origins`` (N arrays (k, 3); the polar stage) and ``origin_confidences`` (N arrays (k,)),
    ``n_dropped`` and any other ``n_*`` counts (copied as they are). ``grid_spacing``: the
    preprocessed grid's spacing (3 values, transposed order). Without ``properties`` (a
    preprocessed array given directly) boxes stay on the preprocessed grid.

    >>> found = {"tight": np.array([[[0, 1], [2, 4], [2, 6]]]), "crop": np.array([[[0, 1], [0, 8], [0, 8]]]),
    ...          "voxels": np.array([6]), "mean_probability": np.array([0.9]), "n_dropped": 0, "fallback": None}
    >>> props = {"shape_after_cropping_and_before_resampling": (1, 8, 8),
    ...          "bbox_used_for_cropping": [[0, 1], [0, 8], [0, 8]], "spacing": (999.0, 1.0, 1.0)}
    >>> obj = objects_report(found, (1, 8, 8), props, [0, 1, 2], [999.0, 1.0, 1.0])["objects"][0]
    >>> obj["box"]["start"], obj["box"]["stop"], obj["area_mm2"], obj["extent_mm"]
    ([0, 2, 2], [1, 4, 6], 6.0, [2.0, 4.0])
    """
    is_2d = float(grid_spacing[0]) >= 998 * max(float(v) for v in grid_spacing[1:])
    voxel_size = float(np.prod(grid_spacing[1:] if is_2d else grid_spacing))
    frame = world_frame(properties) if properties is not None else "preprocessed grid"
    counts = {("n_dropped_below_size_rule" if k == "n_dropped" else k): int(v) for k, v in found.items()
              if k.startswith("n_")}
    report = {"n_objects": int(len(found["tight"])), **counts, "fallback": found["fallback"],
              "axis_order": "input array (as nnU-Net's reader returns it: z, y, x)"
              if properties is not None else "preprocessed grid", "world_frame": frame, "objects": []}

    def to_input(boxes) -> np.ndarray:
        if properties is None:
            return np.asarray(boxes, float).reshape(-1, 3, 2)
        return boxes_to_input_index(boxes, preprocessed_shape, properties, transpose_backward)

    tight = to_input(found["tight"])
    crop = to_input(found["crop"]) if "crop" in found else None
    input_spacing = np.asarray(properties.get("spacing", (1.0, 1.0, 1.0)) if properties is not None else grid_spacing,
                               dtype=float)
    where = properties if properties is not None else {"spacing": tuple(float(v) for v in grid_spacing)}
    for i in range(len(tight)):
        extent = (tight[i, :, 1] - tight[i, :, 0]) * input_spacing
        size = float(found["voxels"][i]) * voxel_size
        obj = {"id": i + 1, "box": _box_record(tight[i], where, frame)}
        if crop is not None:
            obj["crop_box"] = _box_record(crop[i], where, frame)
        if "origins" in found:
            points = np.asarray(found["origins"][i], float).reshape(-1, 3)
            if properties is not None:
                points = points_to_input_index(points, preprocessed_shape, properties, transpose_backward)
            obj["origins"] = [{"index": p.round(3).tolist(), "world_mm": w.round(3).tolist()}
                              for p, w in zip(points, index_to_world(points, where))]
            if "origin_confidences" in found:
                for o, c in zip(obj["origins"], found["origin_confidences"][i]):
                    o["confidence"] = round(float(c), 4)
        if "proposal" in found:
            obj["proposal"] = found["proposal"][i]
            if "rejected" in found and found["proposal"][i] != "coarse argmax":
                obj["rejected_by_fine_stage"] = bool(found["rejected"][i])
        if "fine_confidence" in found:
            obj["fine_mean_foreground_probability"] = round(float(found["fine_confidence"][i]), 4)
        obj.update({"extent_mm": (extent[1:] if is_2d else extent).round(3).tolist(),
                    "area_mm2" if is_2d else "volume_mm3": round(size, 3),
                    "mean_foreground_probability": round(float(found["mean_probability"][i]), 4)})
        report["objects"].append(obj)
    return report
