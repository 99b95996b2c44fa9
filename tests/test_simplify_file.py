"""onnx-simplifier run file to file (``stages.onnx.simplify_file``) gives the bytes of the in-memory API."""
from __future__ import annotations

import onnx
import onnxsim
import pytest
from torch import nn

from reidbuild.errors import StageFailed
from reidbuild.stages.onnx import export_onnx, file_summary, graph_changes, graph_summary, simplify_file


def test_file_to_file_bytes_equal_the_in_memory_simplifier(tmp_path):
    """The stage lets onnx-simplifier's C++ core read and write files (no parsed copy or serialised copy in
    Python); the artifact must still be the deterministic serialisation of what the in-memory API returns."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    src = tmp_path / "export.onnx"
    src.write_bytes(export_onnx(module, 16, 8, 17, dynamic_batch=True))
    exported = onnx.load(str(src))
    expected, ok = onnxsim.simplify(onnx.load(str(src)))
    assert ok
    dst, summary = simplify_file(src, tmp_path / "scratch", "export.onnx")
    data = dst.read_bytes()
    assert data == expected.SerializeToString(deterministic=True)
    assert list((tmp_path / "scratch").iterdir()) == [dst]  # its one result file, the caller's to remove
    assert graph_changes(graph_summary(exported), summary) == graph_changes(exported, expected)
    assert summary["nodes"] == len(expected.graph.node) and data != src.read_bytes()  # it did change something


def test_file_summary_reads_what_onnx_parses(tmp_path):
    """The simplify stage counts the export's ops from its protobuf encoding without parsing the weights;
    the counts must be onnx's own, before and after simplification."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    src = tmp_path / "export.onnx"
    src.write_bytes(export_onnx(module, 16, 8, 17, dynamic_batch=True))
    dst, _ = simplify_file(src, tmp_path / "scratch", "export.onnx")
    for path in (src, dst):
        parsed = graph_summary(onnx.load(str(path)))
        assert file_summary(path) == parsed
        assert parsed["nodes"] > 3 and parsed["initializers"] > 3


def test_file_summary_names_a_broken_file(tmp_path):
    """A truncated or empty file is a one-line StageFailed naming it, not a traceback."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten()).eval()
    data = export_onnx(module, 16, 8, 17, dynamic_batch=True)
    for name, content in (("empty.onnx", b""), ("cut.onnx", data[: len(data) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(StageFailed, match=f"{name}: not a readable ONNX model"):
            file_summary(tmp_path / name)
