"""The label-map path's crop groups on one generated large case: crops, their voxels, the groups of
overlapping crops and their bounding boxes, the most memory the crops kept for open groups took
(their group's slabs are fused when its last crop is in), the stage seconds.

    python -m benchmarks.crop_groups 500x512x512 50     # shape, objects (random-weight networks, oracle coarse)
"""
import resource
import sys
import time

import numpy as np


def main():
    from benchmarks import benchmark as b
    from nnunet_stseg.core import cascade as casc
    shape = tuple(int(v) for v in sys.argv[1].split("x"))
    n = int(sys.argv[2])
    ctx = b._setup("3d", shape, n, 64, None, False, 0, "antialiased", standard=False)
    c, x = ctx["cascade"], ctx["data"]
    c.__dict__["_labels_only"] = (True, ctx["props"])
    orig_init, orig_fuse = casc._CropGroups.__init__, casc._CropGroups.fuse
    stats = {"max_open_mb": 0.0}

    def init(self, boxes, *a, **k):
        orig_init(self, boxes, *a, **k)
        vol = [int(np.prod(h[:, 1] - h[:, 0])) for h in self.hull]
        crops = [int(np.prod(bx[:, 1] - bx[:, 0])) for bx in boxes]
        print("crops", len(boxes), "groups", len(self.hull), "crop voxels M mean/max", np.mean(crops) / 1e6,
              max(crops) / 1e6, "sum", sum(crops) / 1e6, "hull voxels M max", max(vol) / 1e6, "sum", sum(vol) / 1e6,
              flush=True)

    def fuse(self, probs, *a, **k):
        # the crops kept for open groups, with this batch's, before the closed groups let theirs go
        kept = sum(p.numel() * p.element_size() for crops in self.pending.values() for p, _ in crops)
        stats["max_open_mb"] = max(stats["max_open_mb"], (kept + probs.numel() * probs.element_size()) / 2 ** 20)
        return orig_fuse(self, probs, *a, **k)
    casc._CropGroups.__init__, casc._CropGroups.fuse = init, fuse
    print("batch", c.fine_batch_size((64, 64, 64)), flush=True)
    t0 = time.perf_counter()
    out = c.predict_logits_from_preprocessed_data(x)
    print("total", time.perf_counter() - t0, dict(c.stage_seconds), stats, out.dtype, out.shape,
          "maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
    b._remove_work_folders()


if __name__ == "__main__":
    main()
