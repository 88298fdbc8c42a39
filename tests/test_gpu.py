"""The CUDA path: staging through pinned / page-locked shared memory, and a CUDA job's math.

Skipped where there is no CUDA device (``benchmarks/gpu_check.sh`` runs these on the GPU
machine).
"""

from __future__ import annotations

import pytest
import torch

from common.shm import Segment, layout
from worker.staging import Stager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_gradients_staged_on_a_side_stream_into_shared_memory():
    specs = [("w", "float32", (256, 128)), ("b", "float32", (128,))]
    offsets, nbytes = layout(specs)
    seg = Segment.create("gputest", nbytes)
    try:
        views = seg.views(specs, offsets)
        st = Stager()
        st.register_host(seg.data)
        grads = {"w": torch.randn(256, 128, device="cuda"), "b": torch.randn(128, device="cuda")}
        for k, g in grads.items():
            st.copy_to(views[k], g * 2)  # produced on the compute stream, copied on the side stream
        st.record(0, {})
        st.ready(0)
        for k, g in grads.items():
            assert torch.equal(views[k], (g * 2).cpu())
        staged = {"w": grads["w"]}
        st.record(1, staged)  # frames path: reused pinned buffers
        host = st.ready(1)["w"]
        assert host.is_pinned() and torch.equal(host, grads["w"].cpu())
        st.record(2, {"w": grads["w"] + 1})
        assert st.ready(2)["w"].data_ptr() == host.data_ptr()  # allocated once, reused
    finally:
        seg.close()


@cuda
@pytest.mark.timeout(200)
@pytest.mark.parametrize("shm", ["auto", "off"])
def test_cuda_job_matches_reference(procs, tmp_path, shm):
    from tests.test_perf_paths import SMALL, check, expected, run_job

    out = run_job(procs, tmp_path, [*SMALL, "--device", "cuda", "--shm", shm])
    check(out["theta"], expected(), 1e-9)
