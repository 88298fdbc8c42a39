"""safetensors files streamed from pieces and read into fresh memory (ps.stfile).

Compatibility both ways with the safetensors library, every dtype zmqps uses, pieces stacked
into whole tensors, clear errors for broken files, and the memory it promises: a final file
written from pieces and a checkpoint read back each cost no second copy of θ.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.config import ServerConfig
from common.partition import piece_groups, pieces_of
from ps import checkpoint, stfile
from ps.store import ParameterStore

pytestmark = pytest.mark.timeout(120)


def _samples() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "f64": torch.randn(5, 3, dtype=torch.float64, generator=g),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(3, 1, generator=g).bfloat16(),
        "i64": torch.arange(-4, 4, dtype=torch.int64),
        "i32": torch.tensor([1, -2], dtype=torch.int32),
        "i16": torch.tensor([[7]], dtype=torch.int16),
        "i8": torch.tensor([-8, 8], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_a_file_written_here_loads_in_the_library_with_its_metadata(tmp_path):
    t = _samples()
    path = tmp_path / "a.safetensors"
    n = stfile.write_file(path, {k: [v] for k, v in t.items()}, {"format": "x", "n": "1"})
    assert n == path.stat().st_size
    _same(load_file(str(path)), t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "x", "n": "1"}
    (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + hlen) % 8 == 0  # data 8-aligned, as the library writes it


def test_a_file_the_library_wrote_reads_here(tmp_path):
    t = _samples()
    path = tmp_path / "b.safetensors"
    save_file(t, str(path), metadata={"k": "v"})
    got, meta = stfile.read(path)
    _same(got, t)
    assert meta == {"k": "v"}
    assert all(v.untyped_storage().data_ptr() != got["f32"].untyped_storage().data_ptr()
               for k, v in got.items() if k != "f32" and v.numel())  # each tensor its own memory


def test_pieces_land_as_the_whole_tensor_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    whole = {"w": torch.randn(37, 5, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g)}
    keyed = {q.key: q.of(whole[q.base]) for q in pieces_of(whole, 64)}
    assert len(keyed) > 5  # w really is in pieces
    ours, lib = tmp_path / "ours.safetensors", tmp_path / "lib.safetensors"
    stfile.write_file(ours, piece_groups(keyed))
    save_file(whole, str(lib))
    _same(load_file(str(ours)), whole)
    _same(stfile.read(ours)[0], whole)
    # the data section is the same bytes as the library's file (both sort nothing: same order here)
    def data(p):
        raw = p.read_bytes()
        (h,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8:8 + h]), raw[8 + h:]
    (ho, do), (hl, dl) = data(ours), data(lib)
    for k in whole:
        a, b = ho[k]["data_offsets"], hl[k]["data_offsets"]
        assert do[a[0]:a[1]] == dl[b[0]:b[1]]


def test_parts_that_do_not_stack_and_unnamed_dtypes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trailing shape"):
        stfile.write_file(tmp_path / "x", {"w": [torch.zeros(2, 3), torch.zeros(2, 4)]})
    with pytest.raises(ValueError, match="no safetensors name"):
        stfile.write_file(tmp_path / "y", {"c": [torch.zeros(2, dtype=torch.complex64)]})


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_a_broken_file_is_a_clear_error_naming_it(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    stfile.write_file(path, {"w": [torch.randn(64, 64)]})
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[:-100], "garbage": b"\x00" * 64,
                      "header": raw[:8] + b"{not json" + raw[17:]}[damage])
    with pytest.raises(ValueError, match=str(path)):
        stfile.read(path)


def _peak_growth(code: str) -> float:
    """Run ``code`` in a fresh interpreter; it prints peak-RSS growth over its baseline in units of θ."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


# VmHWM, not ru_maxrss: the latter carries over exec from the (large) pytest process.
_PRELUDE = """
    import torch
    from common.procfs import status_bytes
    def rss():
        return status_bytes("VmRSS")
    def peak():
        return status_bytes("VmHWM")
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]); torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
"""


def test_the_final_file_from_pieces_needs_no_copy_of_theta(tmp_path):
    # 64 MiB of θ in 1 MiB pieces; concatenating them (the old way) would add a whole θ.
    growth = _peak_growth(_PRELUDE + f"""
    from common.partition import piece_groups, pieces_of
    from ps import checkpoint
    torch.manual_seed(5)
    theta = {{"w": torch.randn(4096, 4096), "b": torch.randn(4096)}}
    keyed = {{q.key: q.of(theta[q.base]) for q in pieces_of(theta, 1 << 20)}}
    size = sum(t.numel() * 4 for t in theta.values())
    base = rss()
    checkpoint.save_final({str(tmp_path)!r}, piece_groups(keyed))
    print((peak() - base) / size)
    """)
    assert growth < 0.25, growth
    torch.manual_seed(5)
    _same(load_file(str(tmp_path / "final.safetensors")), {"w": torch.randn(4096, 4096), "b": torch.randn(4096)})


def test_resuming_from_a_checkpoint_holds_theta_and_state_once(tmp_path):
    # Adam: θ + 2 slots = 3 θ on disk; the old reader held the file's bytes and the tensors (6 θ).
    cfg = ServerConfig(workers=1, optimizer="adam", checkpoint_dir=str(tmp_path))
    st = ParameterStore(cfg)
    st.initialize({"w": torch.randn(4096, 4096)})
    st.apply({"w": torch.randn(4096, 4096)})
    checkpoint.save_checkpoint(tmp_path, 1, st.params, st.optimizer.state_dict(), {"versions": st.versions})
    growth = _peak_growth(_PRELUDE + f"""
    from ps import checkpoint
    from ps.store import ParameterStore
    from common.config import ServerConfig
    cfg = ServerConfig(workers=1, optimizer="adam", checkpoint_dir={str(tmp_path)!r})
    base = rss()
    params, opt_state, meta = checkpoint.load_checkpoint(checkpoint.latest_checkpoint({str(tmp_path)!r}))
    st = ParameterStore(cfg)
    st.initialize(params, meta["versions"], opt_state, owned=True)
    print((peak() - base) / (4096 * 4096 * 4))
    """)
    assert growth < 3.3, growth  # θ + exp_avg + exp_avg_sq, each read once
    params, opt_state, _ = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert torch.equal(params["w"], st.params["w"])
    assert torch.equal(opt_state["state"][0]["exp_avg_sq"], st.optimizer.state_dict()["state"][0]["exp_avg_sq"])
