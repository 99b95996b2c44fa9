"""The converter's clean-up passes on hand-built nets: chains of views and of affine Power layers merge into
one layer, but only where the intermediate blob feeds nothing else."""
from __future__ import annotations

from reidbuild.caffe.convert.net import Layer, Net
from reidbuild.caffe.convert.passes import finish


def _net(shared: bool) -> Net:
    """input -> Reshape -> Reshape -> Power(2x+1) -> Power(3x+0.5) [-> also Power(x) from p1 when ``shared``]."""
    net = Net(set())
    net.shapes.update({"input": (1, 3, 4, 4), "r1": (1, 48), "r2": (1, 6, 8), "p1": (1, 6, 8), "p2": (1, 6, 8),
                       "side": (1, 6, 8)})
    net.layers = [Layer("input", "Input", [], ["input"]),
                  Layer("r1", "Reshape", ["input"], ["r1"]),
                  Layer("r2", "Reshape", ["r1"], ["r2"]),
                  Layer("p1", "Power", ["r2"], ["p1"], {"power_param": {"scale": 2.0, "shift": 1.0}}),
                  Layer("p2", "Power", ["p1"], ["p2"], {"power_param": {"scale": 3.0, "shift": 0.5}})]
    if shared:
        net.layers.append(Layer("side", "Power", ["p1"], ["side"], {"power_param": {"scale": 5.0}}))
        net.layers.append(Layer("join", "Eltwise", ["p2", "side"], ["sum"], {}))
        net.shapes["sum"] = (1, 6, 8)
    return net


def test_chains_of_views_and_affine_powers_merge() -> None:
    net = _net(shared=False)
    finish(net, "p2")
    assert [(l.type, l.bottom, l.top) for l in net.layers] == [
        ("Input", [], ["input"]), ("Reshape", ["input"], ["r2"]), ("Power", ["r2"], ["output"])]
    assert net.layers[1].params == {"reshape_param": {"shape": {"dim": [0, 6, 8]}}}
    assert net.layers[2].params == {"power_param": {"scale": 6.0, "shift": 3.5}}  # 3 * (2x + 1) + 0.5


def test_a_power_whose_output_feeds_two_layers_is_kept() -> None:
    net = _net(shared=True)
    finish(net, "sum")
    powers = [l for l in net.layers if l.type == "Power"]
    assert [l.name for l in powers] == ["p1", "p2", "side"]  # p1 feeds p2 and side: nothing merges into p2
    assert powers[1].params == {"power_param": {"scale": 3.0, "shift": 0.5}} and powers[1].bottom == ["p1"]
    assert [l.type for l in net.layers].count("Reshape") == 1  # the view chain still merges


def test_a_reshape_to_the_same_shape_disappears() -> None:
    net = Net(set())
    net.shapes.update({"input": (1, 6, 8), "same": (1, 6, 8), "p": (1, 6, 8)})
    net.layers = [Layer("input", "Input", [], ["input"]), Layer("same", "Reshape", ["input"], ["same"]),
                  Layer("p", "Power", ["same"], ["p"], {"power_param": {"scale": 2.0}})]
    finish(net, "p")
    assert [(l.type, l.bottom) for l in net.layers] == [("Input", []), ("Power", ["input"])]
