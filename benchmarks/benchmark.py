"""Inference cost of the segment-then-segment cascade, per stage, for a 2D and a 3D case.

    python -m benchmarks.benchmark                          # prints a markdown table
    python -m benchmarks.benchmark --out docs/benchmarks/inference_cpu.md
    python -m benchmarks.benchmark --scaling --plot docs/benchmarks/scaling_cpu.png --out docs/benchmarks/scaling_cpu.md

``--scaling`` instead times the cascade next to nnU-Net's own ``2d`` sliding-window prediction
of the same preprocessed image, against the number of objects (1 to 50 at 512 x 512) and against
the image size (256 to 2048 at 5 objects), and draws both curves.

``--size_loss`` times the size loss of ``nnUNetTrainer_StSSizes`` (see
:mod:`benchmarks.benchmark_sizes`)::

    python -m benchmarks.benchmark --size_loss --out docs/benchmarks/size_loss_cpu.md

``--compare_paths`` compares a trained cascade's predictions with its objects found on the coarse
grid (since 0.8) and on the full grid (before), image by image (see
:mod:`benchmarks.compare_paths`)::

    python -m benchmarks.benchmark --compare_paths -m MODEL_FOLDER -i IMAGES --labels LABELS --out report.md

``--memory`` runs the 3D case on a large volume (default 1000 x 512 x 512) for several object
counts, each in a fresh process, to show what bounds the peak memory of a prediction, and nnU-Net's
own 3d_fullres sliding window on the same volume (its network at the same width, random weights;
``--memory_standard_step`` 1.0 by default: windows without overlap, the same arrays as nnU-Net's
0.5 in an eighth of the time; 0 leaves that arm out):

    python -m benchmarks.benchmark --memory --out docs/benchmarks/memory_cpu.md

``--fine_batches`` times the planned 3D fine network (``--shape3d``'s plan, S = ``--size``) on
crops in batches of each given size, with the peak memory of its activations, to show what
``CPU_BATCH_VOXELS`` trades (each batch size in a fresh process)::

    python -m benchmarks.benchmark --fine_batches 1 2 4 --out docs/benchmarks/fine_batch_cpu.md

What is measured: one generated case per dimensionality (objects placed at random), nnU-Net
preprocessing through the planned fine configuration, then the cascade stages as the predictor
runs them: coarse pass (downsampling + coarse network + probabilities back on the full grid),
geometry (components, boxes, batched crops, paste-back and fusion), fine pass (all crops through
the fine network), and nnU-Net's export (resampling to the original image, writing NIfTI). Peak
memory is the peak resident set size of a fresh process per case.

The networks are the planned nnU-Net U-Nets with RANDOM weights, and the coarse output is replaced
by the case's ground truth brought to the coarse grid (area averaging; the coarse network still
runs and is timed): timings depend on
network sizes, image sizes and the number of objects, not on what the weights learned, and the
oracle mask makes the number of crops equal the number of objects.
"""
from __future__ import annotations

import cProfile
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_stseg.adapters.config import COARSE_RESAMPLINGS
from nnunet_stseg.atomic import write_atomic
from benchmarks.runner import command_line, command_parser, report_header


_WORK_FOLDERS: list[tuple[int, Path]] = []  # (process id, folder) made by _setup; removed by that process


def _remove_work_folders() -> None:
    """Remove the work folders this process made (a 1000 x 512 x 512 case leaves about 4 GiB: raw
    images, preprocessed case, outputs); a forked child inherits the list but not the folders."""
    mine = [w for w in _WORK_FOLDERS if w[0] == os.getpid()]
    for w in mine:
        _WORK_FOLDERS.remove(w)
        shutil.rmtree(w[1], ignore_errors=True)


def _prepare_case(kind: str, shape, n_objects: int, size: int, features: int | None, seed: int, resampling: str,
                  work: str) -> dict:
    """Generate one case, plan it and preprocess it for the fine configuration; the preprocessed
    case is saved in ``work`` (``case.npy``, ``seg.npy``, ``properties.pkl``). Runs in a process of
    its own, so that the memory generating a large volume took is not counted as the prediction's."""
    import pickle

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(work)
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[v] = str(work / v)
    os.environ.setdefault("nnUNet_compile", "f")
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.config import PlanOptions, fine_config_name
    from nnunet_stseg.data.synthetic import make_synthetic_dataset
    from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess

    dim = 2 if kind == "2d" else 3
    radius = (0.04 * min(shape), 0.08 * min(shape)) if dim == 2 else (0.06 * min(shape[1:]), 0.1 * min(shape[1:]))
    ds = make_synthetic_dataset(os.environ["nnUNet_raw"], 970, f"Bench{kind}", dim=dim, n_train=2, n_test=1,
                                shape=tuple(shape), objects_per_image=(n_objects, n_objects), radius=radius,
                                empty_cases=0, seed=seed)
    plan_and_preprocess(970, PlanOptions(input_size=size, dims=(kind,), base_features=features,
                                         coarse_resampling=resampling), num_processes=1, preprocess=False)
    pp = Path(os.environ["nnUNet_preprocessed"]) / ds.name
    plans_manager = PlansManager(load_json(str(pp / "nnUNetPlans.json")))
    test_img = sorted((ds / "imagesTs").glob("*.nii.gz"))
    gt_file = ds / "labelsTs" / test_img[0].name.replace("_0000.nii.gz", ".nii.gz")
    t0 = time.perf_counter()
    data, seg, props = DefaultPreprocessor(verbose=False).run_case(
        [str(test_img[0])], str(gt_file), plans_manager, plans_manager.get_configuration(fine_config_name(kind, size)),
        load_json(str(pp / "dataset.json")))
    t_pre = time.perf_counter() - t0
    np.save(work / "case.npy", np.ascontiguousarray(data, dtype=np.float32))
    np.save(work / "seg.npy", np.asarray(seg[0], dtype=np.int16))
    with open(work / "properties.pkl", "wb") as f:
        pickle.dump(props, f)
    return {"t_pre": t_pre, "preprocessed": str(pp)}


def _setup(kind: str, shape, n_objects: int, size: int, features: int | None, tta: bool, seed: int,
           resampling: str = "antialiased", standard: bool = True) -> dict:
    """The case of :func:`_prepare_case` (made in a process of its own) loaded, and the cascade
    (random-weight planned networks, oracle coarse output) and, with ``standard``, nnU-Net's
    standard predictor for the same image built. Returns everything the measurements need."""
    import pickle

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="stseg_bench_"))
    _WORK_FOLDERS.append((os.getpid(), work))
    prepared = _in_fresh_process(_prepare_case, (kind, tuple(shape), n_objects, size, features, seed, resampling,
                                                   str(work)))
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[v] = str(work / v)
    os.environ.setdefault("nnUNet_compile", "f")
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.config import coarse_config_name, fine_config_name
    from nnunet_stseg.adapters.predictor import StSPredictor
    from nnunet_stseg.core.geometry import resample_image

    dim = 2 if kind == "2d" else 3
    pp = Path(prepared["preprocessed"])
    plans_manager = PlansManager(load_json(str(pp / "nnUNetPlans.json")))
    dataset_json = load_json(str(pp / "dataset.json"))
    lm = plans_manager.get_label_manager(dataset_json)
    fine_cm = plans_manager.get_configuration(fine_config_name(kind, size))
    coarse_cm = plans_manager.get_configuration(coarse_config_name(kind, size))
    standard_cm = plans_manager.get_configuration("3d_fullres" if dim == 3 else "2d")

    def predictor(cls, cm, trainer_name):
        n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
        network = nnUNetTrainer.build_network_architecture(plans_manager, cm, n_in, lm.num_segmentation_heads, False)
        p = cls(use_mirroring=tta, device=torch.device("cpu"), allow_tqdm=False)
        p.manual_initialization(network, plans_manager, cm, [network.state_dict()], dataset_json, trainer_name,
                                tuple(range(dim)))
        return p

    data = torch.from_numpy(np.load(work / "case.npy"))
    with open(work / "properties.pkl", "rb") as f:
        props = pickle.load(f)
    truth = None  # the oracle's coarse output: the ground truth's foreground averaged on the coarse grid

    class OraclePredictor(StSPredictor):
        def coarse_output(self, x):
            super().coarse_output(x)  # run and time the real coarse pass, then use the truth
            return truth.clone()

    cascade = predictor(OraclePredictor, fine_cm, "nnUNetTrainer_StSFine")
    cascade.coarse = predictor(nnUNetPredictor, coarse_cm, "nnUNetTrainer")
    cascade._log = lambda msg: None
    grid = cascade._coarse_input(data).shape[1:]
    cascade.__dict__.pop("_case_memo")
    foreground = resample_image(torch.from_numpy(np.load(work / "seg.npy") > 0).float()[None], grid)
    truth = torch.cat([1 - foreground, foreground])
    del foreground
    return {"work": work, "plans_manager": plans_manager, "dataset_json": dataset_json, "fine_cm": fine_cm,
            "coarse_cm": coarse_cm, "standard_cm": standard_cm, "cascade": cascade,
            "standard": predictor(nnUNetPredictor, standard_cm, "nnUNetTrainer") if standard else None,
            "data": data, "props": props, "t_pre": prepared["t_pre"]}


def _timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up call (allocator, thread pools). The
    previous call's result is released before the next call (a memory peak is one call's)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _to_labels_cell(row: dict) -> str:
    """'-' where the cascade handed logits to the export (with probabilities), else the conversion's seconds."""
    seconds = row.get("to_labels_s")
    return "-" if seconds is None else f"{seconds:.3f}"


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB; nan elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so that the next reading covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.inference_mode()
def _forward_limit(ctx: dict, n_crops: int, tta: bool) -> float:
    """Seconds of the network forward passes alone, on random input of the shapes the cascade
    feeds them: the coarse network once per sliding window of the coarse input, the fine network on
    all crops in the predictor's batches (``fine_batch_size``, x 2^d with mirroring). Best of 3 after a warm-up."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    cascade = ctx["cascade"]
    coarse_in = cascade._coarse_input(ctx["data"])
    cascade.__dict__.pop("_case_memo", None)
    coarse_patch = list(ctx["coarse_cm"].patch_size)
    grid = [max(a, b) for a, b in zip(coarse_in.shape[-len(coarse_patch):], coarse_patch)]
    n_windows = int(np.prod([len(s) for s in compute_steps_for_sliding_window(grid, coarse_patch, 0.5)]))
    mirrors = 2 ** len(coarse_patch) if tta else 1
    coarse_x = torch.randn(1, coarse_in.shape[0], *coarse_patch)
    fine_patch = list(ctx["fine_cm"].patch_size)
    per_batch = cascade.fine_batch_size(fine_patch)
    fine_batches = [torch.randn(min(per_batch, n_crops - i), ctx["data"].shape[0], *fine_patch)
                    for i in range(0, n_crops, per_batch)]
    coarse_net, fine_net = cascade.coarse.network.eval(), cascade.network.eval()

    def passes():
        for _ in range(n_windows * mirrors):
            coarse_net(coarse_x)
        for _ in range(mirrors):
            for b in fine_batches:
                fine_net(b)
    return _timed(passes, repeats=3)[0]


def _run_case(kind: str, shape, n_objects: int, size: int, features: int | None, tta: bool, seed: int,
              resampling: str = "antialiased", repeats: int = 1, probabilities: bool = False,
              forward_limit: bool = False, profile: int = 0) -> dict:
    """The cascade on one generated case, then nnU-Net's export of its logits: one warm-up, then
    ``repeats`` timed runs (each prediction + export, the previous one's result released first);
    the stage seconds are those of the fastest run; the peak covers the timed runs. Without
    ``probabilities`` as ``nnUNetv2_predict`` without ``--save_probabilities`` runs it (the cascade
    hands the export its label map), with it as with that flag (full-size logits, probabilities exported).
    ``forward_limit``: also time the networks alone on the same inputs (``limit_s``; 4 more passes).
    ``profile``: print the ``profile`` functions of the timed predictions that took longest in
    themselves (cProfile; the seconds then include its overhead)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    ctx = _setup(kind, shape, n_objects, size, features, tta, seed, resampling, standard=False)
    cascade, x = ctx["cascade"], ctx["data"]

    def export(logits):
        # the managers nnUNetv2_predict hands the export with our predictor (slab-by-slab label map)
        export_prediction_from_logits(logits, ctx["props"], cascade.configuration_manager, cascade.plans_manager,
                                      ctx["dataset_json"], str(ctx["work"] / "out"), probabilities)

    cascade.__dict__["_labels_only"] = (not probabilities, ctx["props"])  # what cascade.labels_only() sets
    export(cascade.predict_logits_from_preprocessed_data(x))  # warm-up: allocator, thread pools, writer
    rss_before = _status_mb("VmRSS")
    # Read the process's peak before the reset: the kernel's ru_maxrss follows the reset VmHWM afterwards.
    peak_before_reset_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = _reset_peak_rss()
    best = None
    profiler = cProfile.Profile() if profile else None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        logits = cascade.predict_logits_from_preprocessed_data(x)
        if profiler is not None:
            profiler.disable()
        t_cascade = time.perf_counter() - t0
        timings, stages = dict(cascade.last_timings), dict(cascade.stage_seconds)
        peak_before_export_mb = _status_mb("VmHWM") if reset else float("nan")  # the prediction alone
        t0 = time.perf_counter()
        export(logits)
        t_export = time.perf_counter() - t0
        logits = None
        total = (timings["coarse_s"] + timings["geometry_s"] + stages.get("to_labels", 0.0) + timings["fine_s"]
                 + t_export)
        if best is None or total < best[0]:
            best = (total, t_cascade, t_export, timings, stages, peak_before_export_mb)
    total, t_cascade, t_export, timings, stages, peak_before_export_mb = best
    if profiler is not None:
        print(f"--- profile of the prediction, {n_objects} objects ({timings['n_boxes']} crops) ---", flush=True)
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(profile)
    peak_predict_mb = _status_mb("VmHWM") if reset else float("nan")
    peak_mb = max(peak_before_reset_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  peak_predict_mb if reset else 0.0)
    networks = stages["coarse_network"] + stages["fine_network"]
    outside = timings["geometry_s"] + stages.get("to_labels", 0.0)
    return {"case": kind, "resampling": resampling, **{f"{k}_s": v for k, v in stages.items()},
            "probabilities": probabilities, "to_labels_s": stages.get("to_labels"),
            "outside_per_crop_s": outside / max(1, timings["n_boxes"]), "outside_share": outside / total,
            "networks_s": networks, "other_share": 1 - networks / total,
            "limit_s": _forward_limit(ctx, timings["n_boxes"], tta) if forward_limit else float("nan"), "image": "x".join(str(s) for s in shape),
            "grid": "x".join(str(s) for s in x.shape[1:]),
            "objects": n_objects, "crops": timings["n_boxes"], "preprocess_s": ctx["t_pre"],
            "coarse_s": timings["coarse_s"], "geometry_s": timings["geometry_s"], "fine_s": timings["fine_s"],
            "export_s": t_export, "total_s": total, "geometry_share": timings["geometry_s"] / total,
            "cascade_s": t_cascade, "peak_rss_mb": peak_mb, "rss_before_mb": rss_before,
            "peak_predict_mb": peak_predict_mb, "peak_before_export_mb": peak_before_export_mb, "repeats": repeats,
            "fine_patch": "x".join(str(s) for s in ctx["fine_cm"].patch_size),
            "coarse_patch": "x".join(str(s) for s in ctx["coarse_cm"].patch_size),
            "features": ctx["fine_cm"].network_arch_init_kwargs["features_per_stage"][0]}


def _run_standard_case(shape, n_objects: int, size: int, features: int | None, seed: int, step: float) -> dict:
    """Peak memory of nnU-Net's own 3d_fullres prediction (sliding window with windows ``step``
    patches apart, then nnU-Net's export with its own managers) of the case :func:`_run_case`
    predicts."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    ctx = _setup("3d", shape, n_objects, size, features, False, seed)
    standard, x = ctx["standard"], ctx["data"]
    standard.tile_step_size = step
    del ctx["cascade"]
    rss_before = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    logits = standard.predict_logits_from_preprocessed_data(x)
    t_predict = time.perf_counter() - t0
    peak_before_export_mb = _status_mb("VmHWM") if reset else float("nan")
    t0 = time.perf_counter()
    export_prediction_from_logits(logits, ctx["props"], ctx["standard_cm"], ctx["plans_manager"], ctx["dataset_json"],
                                  str(ctx["work"] / "out_standard"), False)
    return {"predict_s": t_predict, "export_s": time.perf_counter() - t0, "rss_before_mb": rss_before,
            "peak_predict_mb": _status_mb("VmHWM") if reset else float("nan"), "step": step,
            "peak_before_export_mb": peak_before_export_mb,
            "patch": "x".join(str(v) for v in ctx["standard_cm"].patch_size),
            "features": ctx["standard_cm"].network_arch_init_kwargs["features_per_stage"][0]}


@torch.inference_mode()
def _fine_batch_point(shape, size: int, features: int | None, seed: int, batch: int, n_crops: int) -> dict:
    """Seconds of the planned 3D fine network on ``n_crops`` random crops in batches of ``batch``
    (best of 3 after a warm-up) and the peak resident memory those passes add (VmHWM reset after
    the warm-up, minus the resident memory then)."""
    ctx = _setup("3d", shape, 1, size, features, False, seed, standard=False)
    net = ctx["cascade"].network.eval()
    patch = [int(s) for s in ctx["fine_cm"].patch_size]
    crops = torch.randn(n_crops, ctx["data"].shape[0], *patch)

    def passes():
        for i in range(0, n_crops, batch):
            net(crops[i:i + batch])
    passes()
    base = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    seconds = _timed(passes, repeats=3)[0]
    return {"batch": batch, "crops": n_crops, "patch": "x".join(str(s) for s in patch),
            "features": ctx["fine_cm"].network_arch_init_kwargs["features_per_stage"][0],
            "seconds": seconds, "per_crop_s": seconds / n_crops,
            "activations_mb": _status_mb("VmHWM") - base if reset else float("nan")}


def fine_batches(args, cmd: str) -> str:
    """Time and activation memory of the fine network per CPU batch size (each in a fresh process)."""
    step = int(np.lcm.reduce(args.fine_batches))
    n_crops = step * -(-8 // step)  # every batch size full, at least 8 crops
    rows = []
    for b in args.fine_batches:
        r = _in_fresh_process(_fine_batch_point, (tuple(args.shape3d), args.size, args.features, args.seed, b, n_crops))
        rows.append(r)
        print(f"batch {b}: {r}", flush=True)
    lines = [
        *report_header("Fine network batch size on the CPU", cmd),
        f"Budget: the planned 3D fine network (S = {args.size}, random weights, no TTA) on {n_crops} random crops "
        "in batches of each size, best of 3 timed passes after a warm-up, each batch size in a fresh process; "
        "'activations' = peak resident memory during the timed passes above the resident memory before them.",
        "",
        "| batch | crops | patch | width | seconds | per crop s | activations MiB |",
        "|---" * 7 + "|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['crops']} | {r['patch']} | {r['features']} | {r['seconds']:.2f} | "
                     f"{r['per_crop_s']:.3f} | {r['activations_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _scaling_point(shape, n_objects: int, size: int, features: int | None, tta: bool, seed: int) -> dict:
    """Cascade vs nnU-Net's standard 2d sliding window on the same preprocessed image."""
    ctx = _setup("2d", shape, n_objects, size, features, tta, seed)
    x = ctx["data"]
    t_cascade, _ = _timed(lambda: ctx["cascade"].predict_logits_from_preprocessed_data(x), repeats=2)
    t_standard, _ = _timed(lambda: ctx["standard"].predict_logits_from_preprocessed_data(x), repeats=2)
    return {"image": int(shape[0]), "objects": n_objects, "crops": ctx["cascade"].last_timings["n_boxes"],
            "cascade_s": t_cascade, "standard_s": t_standard,
            "standard_patch": "x".join(str(s) for s in ctx["standard_cm"].patch_size),
            "standard_width": ctx["standard_cm"].network_arch_init_kwargs["features_per_stage"][0]}


def _report_to(queue, fn, args) -> None:
    """Run ``fn(*args)`` in a worker process: its result, or the error, goes to ``queue`` (the parent
    never hangs); the generated cases' work folders are removed either way."""
    try:
        queue.put(fn(*args))
    except BaseException as e:
        queue.put({"error": repr(e)})
    finally:
        _remove_work_folders()


def _in_fresh_process(fn, args) -> dict:
    """``fn(*args)`` in a fresh (spawned) process, so that its memory figures are its own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_report_to, args=(q, fn, args))
    proc.start()
    r = q.get()
    proc.join()
    if "error" in r:
        raise SystemExit(f"benchmark point {args} failed: {r['error']}")
    return r


def scaling(args, cmd: str) -> str:
    """Cascade vs nnU-Net's sliding window: time against object count and against image size."""
    rows_objects = [_in_fresh_process(_scaling_point, ((args.scaling_size,) * 2, n, args.size, args.features,
                                                        args.tta, args.seed)) for n in args.objects_list]
    rows_sizes = [_in_fresh_process(_scaling_point, ((side,) * 2, args.scaling_objects, args.size, args.features,
                                                      args.tta, args.seed)) for side in args.sizes]
    for r in rows_objects + rows_sizes:
        print(r, flush=True)
    lines = [
        *report_header("Inference time: cascade vs nnU-Net's sliding window (CPU)", cmd),
        f"Budget: 2D generated images, S = {args.size}, TTA {'on' if args.tta else 'off'}, random-weight planned "
        f"networks (nnU-Net's default width unless --features), oracle coarse mask (crops = its components on the "
        f"coarse grid: objects that touch there share one), best of 2 timed runs after a warm-up; nnU-Net "
        f"preprocessing and export excluded. 'standard' = nnU-Net's "
        f"planned `2d` configuration predicting the same preprocessed image with its sliding window.", "",
        f"## Versus objects per image ({args.scaling_size} x {args.scaling_size})", "",
        "| objects placed | crops | cascade s | standard 2d s | standard patch |", "|---|---|---|---|---|"]
    lines += [f"| {r['objects']} | {r['crops']} | {r['cascade_s']:.3f} | {r['standard_s']:.3f} | "
              f"{r['standard_patch']} |" for r in rows_objects]
    lines += ["", f"## Versus image size ({args.scaling_objects} objects)", "",
              "| image | crops | cascade s | standard 2d s | standard patch |", "|---|---|---|---|---|"]
    lines += [f"| {r['image']}x{r['image']} | {r['crops']} | {r['cascade_s']:.3f} | {r['standard_s']:.3f} | "
              f"{r['standard_patch']} |" for r in rows_sizes]
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot([r["crops"] for r in rows_objects], [r["cascade_s"] for r in rows_objects], "o-", label="cascade")
        a.plot([r["crops"] for r in rows_objects], [r["standard_s"] for r in rows_objects], "s--",
               label="nnU-Net 2d sliding window")
        a.set(xlabel="objects (crops) per image", ylabel="seconds per image",
              title=f"{args.scaling_size}x{args.scaling_size}, S={args.size}")
        b.loglog([r["image"] for r in rows_sizes], [r["cascade_s"] for r in rows_sizes], "o-", label="cascade")
        b.loglog([r["image"] for r in rows_sizes], [r["standard_s"] for r in rows_sizes], "s--",
                 label="nnU-Net 2d sliding window")
        b.set(xlabel="image side (pixels)", ylabel="seconds per image",
              title=f"{args.scaling_objects} objects, S={args.size}")
        for ax in (a, b):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle("CPU inference time (2 cores), random-weight networks", fontsize=10)
        fig.tight_layout()
        write_atomic(args.plot, figure=fig)
        plt.close(fig)
        lines += ["", f"![scaling plot]({args.plot.name})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = command_parser("benchmark", __doc__)
    p.add_argument("-s", "--size", type=int, default=64, help="input size S (64)")
    p.add_argument("--features", type=int, default=None, help="base U-Net width (nnU-Net default 32)")
    p.add_argument("--objects", type=int, default=5, help="objects per case (5)")
    p.add_argument("--shape2d", type=int, nargs=2, default=(1024, 1024))
    p.add_argument("--shape3d", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse_resampling", nargs="+", choices=COARSE_RESAMPLINGS,
                   default=["nnunet", "antialiased"],
                   help="coarse resamplings to time side by side (both: before and since 0.8); --memory uses the "
                        "last")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--repeats", type=int, default=5,
                   help="per-stage report: timed runs per case after the warm-up, the fastest reported (5)")
    p.add_argument("--scaling", action="store_true",
                   help="instead: cascade vs nnU-Net sliding window against object count and image size (2D)")
    p.add_argument("--objects_list", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--scaling_size", type=int, default=512, help="image side for the object sweep")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--scaling_objects", type=int, default=5, help="objects for the size sweep")
    p.add_argument("--plot", type=Path, default=None, help="with --scaling: write the plot (PNG) here")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak memory of a large 3D case (--memory_shape) for each of --memory_objects")
    p.add_argument("--memory_shape", type=int, nargs=3, default=(1000, 512, 512))
    p.add_argument("--memory_objects", type=int, nargs="+", default=[5, 50, 200])
    p.add_argument("--memory_rows", type=Path, default=None,
                   help="--memory: rebuild the report from the rows an earlier run kept (<out>.json), measuring nothing")
    p.add_argument("--memory_with_probabilities", action="store_true",
                   help="--memory: also the first object count as with --save_probabilities")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="--memory: print the N functions of each row's timed prediction that took longest in "
                        "themselves (cProfile)")
    p.add_argument("--memory_standard_step", type=float, default=1.0,
                   help="--memory: tile step of nnU-Net's 3d_fullres arm (1.0: no overlap, same arrays as 0.5; 0: "
                        "leave the arm out)")
    p.add_argument("--fine_batches", type=int, nargs="+", default=None,
                   help="time the planned 3D fine network per CPU batch size (e.g. 1 2 4)")
    p.add_argument("--compare_paths", action="store_true",
                   help="instead: a trained cascade's predictions with objects found on the coarse grid (0.8) vs on "
                        "the full grid (before), image by image (see benchmarks/compare_paths.py)")
    p.add_argument("--prediction_modes", action="store_true",
                   help="instead: nnUNetv2_predict of model -m on images -i in its own process and with nnU-Net's "
                        "workers (STSEG_PREDICT_IN_PROCESS)")
    p.add_argument("-m", "--model", type=Path, default=None,
                   help="--compare_paths: the fine model's folder; --prediction_modes: the model's folder")
    p.add_argument("-i", "--images", type=Path, default=None, help="--compare_paths, --prediction_modes: images")
    p.add_argument("--labels", type=Path, default=None, help="--compare_paths: folder of ground-truth labels")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=[0],
                   help="--compare_paths, --prediction_modes: folds (0)")
    p.add_argument("--limit", type=int, default=None, help="--compare_paths, --prediction_modes: the first N images")
    p.add_argument("-device", "--device", default="cpu",
                   help="--compare_paths, --prediction_modes: cpu, cuda, mps (cpu)")
    p.add_argument("--size_loss", action="store_true",
                   help="instead: what the size loss of nnUNetTrainer_StSSizes costs (flips, training step)")
    p.add_argument("--size_loss_sides", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--size_loss_batch", type=int, default=16)
    p.add_argument("--size_loss_steps", type=int, default=1000, help="steps of the free-logit trace (1000)")
    args = p.parse_args(argv)
    cmd = command_line(p, argv)
    on_a_model = "--compare_paths" if args.compare_paths else "--prediction_modes" if args.prediction_modes else None
    if on_a_model and (args.model is None or args.images is None):
        p.error(f"{on_a_model} needs -m MODEL_FOLDER and -i IMAGES")
    if args.compare_paths:
        from benchmarks.compare_paths import compare_paths

        report = compare_paths(args, cmd)
    elif args.prediction_modes:
        from benchmarks.prediction_modes import prediction_modes

        report = prediction_modes(args, cmd)
    elif args.size_loss:
        from benchmarks.benchmark_sizes import size_loss_report

        report = size_loss_report(args, cmd)
    elif args.scaling:
        report = scaling(args, cmd)
    elif args.memory:
        report = memory(args, cmd)
    elif args.fine_batches:
        report = fine_batches(args, cmd)
    else:
        report = per_stage(args, cmd)
    print("\n" + report)
    if args.out is not None:
        write_atomic(args.out, report)


def _libraries_mb() -> dict:
    """Resident memory of a fresh process once torch, nnU-Net's predictor and ours are imported."""
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401

    import nnunet_stseg.adapters.predictor  # noqa: F401
    return {"libraries_mb": _status_mb("VmRSS")}


def memory(args, cmd: str) -> str:
    """Peak RSS of the whole cascade (preprocessed case in, nnU-Net export out) on a large volume,
    and of nnU-Net's own 3d_fullres on the same volume. The measured rows are kept in
    ``<out>.json`` (``--memory_rows`` rebuilds the report from them)."""
    import json

    if args.memory_rows is not None:
        saved = json.loads(Path(args.memory_rows).read_text())
        args.memory_objects = saved.get("memory_objects", [r["objects"] for r in saved["rows"]])
        return memory_report(saved["rows"], saved["standard"], tuple(saved["shape"]), args, saved["command"],
                             saved["libraries_mb"])
    shape = tuple(args.memory_shape)
    libraries_mb = _in_fresh_process(_libraries_mb, ())["libraries_mb"]
    rows = []
    runs = [(n, False) for n in args.memory_objects]
    runs += [(args.memory_objects[0], True)] if args.memory_with_probabilities else []
    for n, probabilities in runs:
        r = _in_fresh_process(_run_case, ("3d", shape, n, args.size, args.features, args.tta, args.seed,
                                             args.coarse_resampling[-1], 1, probabilities, False, args.profile))
        rows.append(r)
        print(r, flush=True)
    standard = None
    if args.memory_standard_step > 0:
        standard = _in_fresh_process(_run_standard_case, (shape, args.memory_objects[0], args.size, args.features,
                                                        args.seed, args.memory_standard_step))
        print(standard, flush=True)
    if args.out is not None:
        write_atomic(Path(args.out).with_suffix(".json"), json.dumps(
            {"command": cmd, "shape": shape, "memory_objects": args.memory_objects, "libraries_mb": libraries_mb,
             "rows": rows, "standard": standard},
            indent=1, default=str) + "\n")
    return memory_report(rows, standard, shape, args, cmd, libraries_mb)


def memory_report(rows: list[dict], standard: dict | None, shape, args, cmd: str,
                  libraries_mb: float | None = None) -> str:
    volume_mb = 4 * int(np.prod(shape)) / 2 ** 20
    lines = [
        *report_header("Peak memory of a large 3D prediction (CPU)", cmd),
        f"Budget: one generated {'x'.join(map(str, shape))} volume per row ({np.prod(shape) / 1e6:.0f} M voxels, "
        f"{volume_mb / 1024:.1f} GiB as float32), S = {args.size}, TTA {'on' if args.tta else 'off'}, "
        f"random-weight planned networks (width {rows[0]['features']}) with an oracle coarse mask; each row in a "
        "fresh process. 'before' = resident memory once the preprocessed case is loaded (torch, the networks, the "
        "case); 'peak during prediction' = peak resident memory (VmHWM, reset just before) over the prediction "
        "(the cascade and its export: a warm-up whose result is released, then the timed run) and nnU-Net's export of "
        "that case (with our predictor's plans manager for the cascade, as `nnUNetv2_predict` runs it; nnU-Net's "
        "own for 3d_fullres); 'of it before the export' = the same peak read when the prediction returned; "
        "'peak of the process' also covers loading the case and building the networks (the case is generated, "
        "planned and preprocessed in a process of its own).", "",
        "'to labels s' = converting the fused crops to labels (without `--save_probabilities` the cascade hands the "
        "export its label map; with it the export converts the full-size logits); 'outside the networks' = geometry "
        "+ to labels, per crop and as a share of the case's time (coarse + geometry + to labels + fine + export); "
        "'geometry' alone as a share of the case's time; 'added' = (peak during prediction - before) / float32 "
        "volume, what the prediction and the export themselves hold."
        + ("" if libraries_mb is None else
           f" Of 'before', {libraries_mb:.0f} MiB ({libraries_mb / volume_mb:.1f} x the float32 volume) is torch, "
           "nnU-Net and this package imported in a fresh process, before any case or network."), "",
        "| prediction | objects | crops | coarse s | geometry s | to labels s | fine s | export s "
        "| outside the networks s per crop | of the case's time | geometry of the case's time | before MiB "
        "| peak during prediction MiB | of it before the export MiB | peak / float32 volume | added / float32 volume "
        "| peak of the process MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "cascade, --save_probabilities" if r.get("probabilities") else "cascade"
        lines.append(f"| {name} | {r['objects']} | {r['crops']} | {r['coarse_s']:.1f} | {r['geometry_s']:.1f} | "
                     f"{_to_labels_cell(r)} | {r['fine_s']:.1f} | {r['export_s']:.1f} | "
                     f"{r.get('outside_per_crop_s', float('nan')):.3f} | {r.get('outside_share', float('nan')):.0%} | "
                     f"{r['geometry_share']:.0%} | {r['rss_before_mb']:.0f} | "
                     f"{r['peak_predict_mb']:.0f} | {r['peak_before_export_mb']:.0f} | "
                     f"{r['peak_predict_mb'] / volume_mb:.1f} | "
                     f"{(r['peak_predict_mb'] - r['rss_before_mb']) / volume_mb:.2f} | {r['peak_rss_mb']:.0f} |")
    if standard is not None:
        lines.append(f"| nnU-Net 3d_fullres | {args.memory_objects[0]} | - | - | - | - | {standard['predict_s']:.1f} "
                     f"(sliding window) | {standard['export_s']:.1f} | - | - | - | {standard['rss_before_mb']:.0f} | "
                     f"{standard['peak_predict_mb']:.0f} | {standard['peak_before_export_mb']:.0f} | "
                     f"{standard['peak_predict_mb'] / volume_mb:.1f} | "
                     f"{(standard['peak_predict_mb'] - standard['rss_before_mb']) / volume_mb:.2f} | - |")
        lines += ["", f"nnU-Net 3d_fullres: patch {standard['patch']}, width {standard['features']}, windows "
                  f"{standard['step']} patch apart (nnU-Net's default is 0.5: more windows, the same arrays), "
                  "TTA off. Cascade peak / 3d_fullres peak: "
                  + ", ".join(f"{r['objects']} objects {r['peak_predict_mb'] / standard['peak_predict_mb']:.2f}"
                              for r in rows) + "."]
    return "\n".join(lines) + "\n"


def per_stage(args, cmd: str) -> str:
    """Per-stage cost of one 2D and one 3D case for each coarse resampling, each in a fresh process
    (its own peak RSS)."""
    rows = []
    for kind, shape in (("2d", tuple(args.shape2d)), ("3d", tuple(args.shape3d))):
        for resampling in args.coarse_resampling:
            r = _in_fresh_process(_run_case, (kind, shape, args.objects, args.size, args.features, args.tta,
                                                 args.seed, resampling, args.repeats, False, True))
            rows.append(r)
            print(f"{kind} {resampling}: {r}", flush=True)
    lines = [
        *report_header("Cascade inference cost per stage (CPU)", cmd),
        f"Budget: one case per row, S = {args.size}, TTA {'on' if args.tta else 'off'}, "
        f"{args.objects} objects per case, random-weight planned networks with an oracle coarse mask "
        f"(see `benchmarks/benchmark.py`); each row in a fresh process: the cascade and nnU-Net's export "
        f"run once to warm up, then {args.repeats} timed runs, the fastest one's seconds reported (at 2D sizes "
        "one run's seconds vary by more than the differences this table is read for).",
        "",
        "| case | image | coarse resampling | crops | coarse patch | fine patch | width | coarse input s "
        "| coarse network s | coarse to full grid s | geometry s | fine network s | export s | total s "
        "| other than networks | limit s | peak RSS MB |",
        "|---" * 17 + "|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['image']} | {r['resampling']} | {r['crops']} | {r['coarse_patch']} | "
                     f"{r['fine_patch']} | {r['features']} | {r['coarse_input_s']:.3f} | {r['coarse_network_s']:.3f} "
                     f"| {r['coarse_to_full_grid_s']:.3f} | {r['geometry_s']:.3f} | {r['fine_network_s']:.3f} | "
                     f"{r['export_s']:.3f} | {r['total_s']:.3f} | {100 * r['other_share']:.0f}% | "
                     f"{r['limit_s']:.3f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "total = coarse input + coarse network + coarse to full grid (+ the mask) + geometry + fine network "
              "+ export (nnU-Net preprocessing not included). coarse input = the case brought to the coarse grid "
              "(`nnunet`: the plans' nnU-Net resampling on the CPU, versions before 0.8; `antialiased`: "
              "`core.geometry.resample_image` on the network's device). geometry = connected components, boxes, "
              "batched crop resampling, paste-back and fusion. other than networks = 1 - (coarse network + fine "
              "network) / total. limit = the network forward passes alone on random input of the same shapes "
              "(coarse windows and fine crop batches), the floor no pipeline around these networks can go below."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
