"""Inference cost of the segment-then-segment cascade, per stage, for a 2D and a 3D case.

    nnunet-stseg-benchmark                          # prints a markdown table
    nnunet-stseg-benchmark --out docs/benchmarks/inference_cpu.md

What is measured: one generated case per dimensionality (objects placed at random), nnU-Net
preprocessing through the planned fine configuration, then the cascade stages as the predictor
runs them: coarse pass (downsampling + coarse network + probabilities back on the full grid),
geometry (components, boxes, batched crops, paste-back and fusion), fine pass (all crops through
the fine network), and nnU-Net's export (resampling to the original image, writing NIfTI). Peak
memory is the peak resident set size of a fresh process per case.

The networks are the planned nnU-Net U-Nets with RANDOM weights, and the coarse mask is replaced
by the case's ground truth (the coarse network still runs and is timed): timings depend on
network sizes, image sizes and the number of objects, not on what the weights learned, and the
oracle mask makes the number of crops equal the number of objects.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _case_worker(kind: str, shape: tuple[int, ...], n_objects: int, size: int, features: int | None, tta: bool,
                 seed: int, queue) -> None:
    try:
        queue.put(_run_case(kind, shape, n_objects, size, features, tta, seed))
    except BaseException as e:  # report, don't hang the parent
        queue.put({"error": repr(e)})


def _run_case(kind: str, shape, n_objects: int, size: int, features: int | None, tta: bool, seed: int) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="stseg_bench_"))
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[v] = str(work / v)
    os.environ.setdefault("nnUNet_compile", "f")
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_stseg.cli import plan_and_preprocess
    from nnunet_stseg.config import coarse_config_name, fine_config_name
    from nnunet_stseg.predictor import StSPredictor
    from nnunet_stseg.synthetic import make_synthetic_dataset

    dim = 2 if kind == "2d" else 3
    radius = (0.04 * min(shape), 0.08 * min(shape)) if dim == 2 else (0.06 * min(shape[1:]), 0.1 * min(shape[1:]))
    ds = make_synthetic_dataset(os.environ["nnUNet_raw"], 970, f"Bench{kind}", dim=dim, n_train=2, n_test=1,
                                shape=tuple(shape), objects_per_image=(n_objects, n_objects), radius=radius,
                                empty_cases=0, seed=seed)
    plan_and_preprocess(970, size, dims=[kind], base_features=features, num_processes=1, preprocess=False)
    pp = Path(os.environ["nnUNet_preprocessed"]) / ds.name
    plans_manager = PlansManager(load_json(str(pp / "nnUNetPlans.json")))
    dataset_json = load_json(str(pp / "dataset.json"))
    lm = plans_manager.get_label_manager(dataset_json)
    fine_cm = plans_manager.get_configuration(fine_config_name(kind, size))
    coarse_cm = plans_manager.get_configuration(coarse_config_name(kind, size))

    def net(cm):
        n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
        return nnUNetTrainer.build_network_architecture(plans_manager, cm, n_in, lm.num_segmentation_heads, False)

    device = torch.device("cpu")
    mirror = tuple(range(dim))
    coarse = nnUNetPredictor(use_mirroring=tta, device=device, allow_tqdm=False)
    coarse_net = net(coarse_cm)
    coarse.manual_initialization(coarse_net, plans_manager, coarse_cm, [coarse_net.state_dict()], dataset_json,
                                 "nnUNetTrainer", mirror)
    test_img = sorted((ds / "imagesTs").glob("*.nii.gz"))
    gt_file = ds / "labelsTs" / test_img[0].name.replace("_0000.nii.gz", ".nii.gz")
    pre = DefaultPreprocessor(verbose=False)
    t0 = time.perf_counter()
    data, seg, props = pre.run_case([str(test_img[0])], str(gt_file), plans_manager, fine_cm, dataset_json)
    t_pre = time.perf_counter() - t0
    gt = torch.from_numpy(seg[0].astype(np.int64))

    class OraclePredictor(StSPredictor):
        def coarse_probabilities(self, x):
            super().coarse_probabilities(x)  # run and time the real coarse pass, then use the truth
            return torch.stack([(gt == 0), (gt > 0)]).float()

    fine = OraclePredictor(use_mirroring=tta, device=device, allow_tqdm=False)
    fine.manual_initialization(net(fine_cm), plans_manager, fine_cm, None, dataset_json, "nnUNetTrainer_StSFine",
                               mirror)
    fine.coarse = coarse
    fine._log = lambda msg: None
    x = torch.from_numpy(np.ascontiguousarray(data))
    fine.predict_logits_from_preprocessed_data(x)  # warm-up (allocator, thread pools)
    t0 = time.perf_counter()
    logits = fine.predict_logits_from_preprocessed_data(x)
    t_cascade = time.perf_counter() - t0
    timings = dict(fine.last_timings)
    t0 = time.perf_counter()
    export_prediction_from_logits(logits, props, fine_cm, plans_manager, dataset_json, str(work / "out"), False)
    t_export = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = timings["coarse_s"] + timings["geometry_s"] + timings["fine_s"] + t_export
    return {"case": kind, "image": "x".join(str(s) for s in shape), "grid": "x".join(str(s) for s in x.shape[1:]),
            "objects": n_objects, "crops": timings["n_boxes"], "preprocess_s": t_pre,
            "coarse_s": timings["coarse_s"], "geometry_s": timings["geometry_s"], "fine_s": timings["fine_s"],
            "export_s": t_export, "total_s": total, "geometry_share": timings["geometry_s"] / total,
            "cascade_s": t_cascade, "peak_rss_mb": peak_mb,
            "fine_patch": "x".join(str(s) for s in fine_cm.patch_size),
            "coarse_patch": "x".join(str(s) for s in coarse_cm.patch_size),
            "features": plans_manager.get_configuration(fine_config_name(kind, size)).network_arch_init_kwargs[
                "features_per_stage"][0]}


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, no GPU used; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="nnunet-stseg-benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-s", "--size", type=int, default=64, help="input size S (64)")
    p.add_argument("--features", type=int, default=None, help="base U-Net width (nnU-Net default 32)")
    p.add_argument("--objects", type=int, default=5, help="objects per case (5)")
    p.add_argument("--shape2d", type=int, nargs=2, default=(1024, 1024))
    p.add_argument("--shape3d", type=int, nargs=3, default=(64, 256, 256))
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (off by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    rows = []
    ctx = mp.get_context("spawn")
    for kind, shape in (("2d", tuple(args.shape2d)), ("3d", tuple(args.shape3d))):
        q = ctx.Queue()
        proc = ctx.Process(target=_case_worker, args=(kind, shape, args.objects, args.size, args.features, args.tta,
                                                      args.seed, q))
        proc.start()
        r = q.get()
        proc.join()
        if "error" in r:
            raise SystemExit(f"benchmark case {kind} failed: {r['error']}")
        rows.append(r)
        print(f"{kind}: {r}", flush=True)

    cmd = "nnunet-stseg-benchmark " + " ".join(argv if argv is not None else os.sys.argv[1:])
    lines = [
        "# Cascade inference cost per stage (CPU)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine_line()}  ",
        f"Budget: one case per row, S = {args.size}, TTA {'on' if args.tta else 'off'}, "
        f"{args.objects} objects per case, random-weight planned networks with an oracle coarse mask "
        "(see `nnunet_stseg/benchmark.py`).",
        "",
        "| case | image | preprocessed grid | crops | coarse patch | fine patch | width | coarse s | geometry s "
        "| fine s | export s | total s | geometry share | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['image']} | {r['grid']} | {r['crops']} | {r['coarse_patch']} | "
                     f"{r['fine_patch']} | {r['features']} | {r['coarse_s']:.3f} | {r['geometry_s']:.3f} | "
                     f"{r['fine_s']:.3f} | {r['export_s']:.3f} | {r['total_s']:.3f} | "
                     f"{100 * r['geometry_share']:.1f}% | {r['peak_rss_mb']:.0f} |")
    lines += ["", "total = coarse + geometry + fine + export (nnU-Net preprocessing not included); geometry = "
              "connected components, boxes, batched crop resampling, paste-back and fusion."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(".tmp_" + args.out.name)
        tmp.write_text(report)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
