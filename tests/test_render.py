"""blockfinder.render on hand-made dependency graphs (independent of the analysis engine)."""

from __future__ import annotations

import html
import shutil
import time
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from blockfinder.errors import BlockfinderError
from blockfinder.render import (
    INSTALL_HINT,
    LOSS_PALETTE,
    REGULARIZER_PALETTE,
    loss_colors,
    render,
    to_dot,
)
from blockfinder.report import BlockReport, BranchPoint, ImpartialityBlock

HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="graphviz 'dot' not installed")

A, B, KL = 0b001, 0b010, 0b100


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()

    def node(name, op="call", reach=0, module="", shared=False, **kw):
        g.add_node(name, op=op, reach=reach, module=module, shared=shared, **kw)

    node("x", op="input", target="input", shape=(8, 3), reach=A | B | KL)
    node("enc_w", "parameter", A | B | KL, "enc.lin", True, param="enc.lin.weight", shape=(4, 3))
    node("enc_mm", "call", A | B | KL, "enc.lin", True, target="aten.mm", shape=(8, 4))
    node("z", "call", A | B | KL, "", True, target="aten.add", shape=(8, 4))
    node("kl_pow", "call", KL, "", target="aten.pow", shape=(8, 4))
    node("kl_sum", "call", KL, "", target="aten.sum", shape=())
    node("dec_w", "parameter", A | B, "dec.trunk.0", True, param="dec.trunk.0.weight", shape=(5, 4))
    node("dec_mm", "call", A | B, "dec.trunk.0", True, target="aten.mm", shape=(8, 5))
    node("dec_relu", "call", A | B, "dec.trunk.1", True, target="aten.relu", shape=(8, 5))
    node("ha_w", "parameter", A, "dec.heads.0", param="dec.heads.0.weight", shape=(2, 5))
    node("ha", "call", A, "dec.heads.0", target="aten.mm", shape=(8, 2))
    node("hb_w", "parameter", B, "dec.heads.1", param='dec.heads.1.we"ird\\', shape=(1, 5))
    node("hb", "call", B, "dec.heads.1", target="<lambda>", shape=(8, 1))
    node("ra", "call", A, "", target="aten.mse_loss", shape=())
    node("rb", "call", B, "", target="aten.mse_loss", shape=())
    node("metric", "call", 0, "", target="aten.argmax", shape=(8,))  # reaches no loss: hidden
    for name, loss in (("loss_a", "rec_a"), ("loss_b", "rec<b>"), ("loss_kl", "kl")):
        g.add_node(name, op="loss", loss=loss, module="", shape=(), reach=0)
    edges = [
        ("x", "enc_mm"),
        ("enc_w", "enc_mm"),
        ("enc_mm", "z"),
        ("z", "kl_pow"),
        ("kl_pow", "kl_sum"),
        ("kl_sum", "loss_kl"),
        ("z", "dec_mm"),
        ("dec_w", "dec_mm"),
        ("dec_mm", "dec_relu"),
        ("dec_relu", "ha"),
        ("ha_w", "ha"),
        ("dec_relu", "hb"),
        ("hb_w", "hb"),
        ("ha", "ra"),
        ("hb", "rb"),
        ("ra", "loss_a"),
        ("rb", "loss_b"),
        ("ha", "metric"),
    ]
    for u, v in edges:
        g.add_edge(u, v, grad=True)
    g.add_edge("enc_mm", "kl_sum", grad=False)  # a non-gradient edge (drawn dashed)
    g.nodes["loss_a"]["reach"] = A
    g.nodes["loss_b"]["reach"] = B
    g.nodes["loss_kl"]["reach"] = KL
    return g


def _report(graph: nx.DiGraph | None = None) -> BlockReport:
    graph = _graph() if graph is None else graph
    losses = ("rec_a", "rec<b>", "kl")
    bps = [
        BranchPoint(0, 0, "activation", "<top>", "z", (8, 4), (frozenset({"rec_a", "rec<b>"}),
                                                              frozenset({"kl"}))),
        BranchPoint(1, 0, "activation", "dec.trunk.1", "dec_relu", (8, 5),
                    (frozenset({"rec_a"}), frozenset({"rec<b>"}))),
    ]  # fmt: skip
    block = ImpartialityBlock(
        0,
        frozenset(losses),
        ("enc_w", "enc_mm", "z", "dec_w", "dec_mm", "dec_relu"),
        ("enc.lin.weight", "dec.trunk.0.weight"),
    )
    return BlockReport(
        losses=losses,
        regularizers=("kl",),
        parameters={
            "enc.lin.weight": frozenset(losses),
            "dec.trunk.0.weight": frozenset({"rec_a", "rec<b>"}),
        },
        blocks=[block],
        branch_points=bps,
        capture="hand-made",
        graph=graph,
        loss_values={"rec_a": 1.5, "rec<b>": 0.25, "kl": 3.0},
    )


def _node_lines(source: str) -> dict[str, str]:
    """DOT node statements by the first line of their label (plain or HTML label)."""
    out = {}
    for line in source.splitlines():
        line = line.strip()
        if not (line.startswith("n") and "[label=" in line):
            continue
        if '[label="' in line:
            label = line.split('label="', 1)[1].split('"', 1)[0].split("\\n")[0]
        else:  # HTML label of a striped node: <<table ...><tr><td>first<br/>...
            label = line.split("<td>", 1)[1].split("<br/>", 1)[0].split("</td>", 1)[0]
            label = html.unescape(label)
        out[label] = line
    return out


def test_colours_one_per_loss_and_grey_regularizers():
    colors = loss_colors(_report())
    assert colors["rec_a"] == LOSS_PALETTE[0]
    assert colors["rec<b>"] == LOSS_PALETTE[1]
    assert colors["kl"] in REGULARIZER_PALETTE


def test_palette_cycles_for_many_losses():
    names = tuple(f"l{i}" for i in range(len(LOSS_PALETTE) + 3))
    report = BlockReport(names, (), {}, [], [], "x")
    colors = loss_colors(report)
    assert len(set(colors.values())) == len(LOSS_PALETTE)
    assert all(c.startswith("#") for c in colors.values())


def test_collapse_depth_2_groups_modules_and_keeps_losses_and_branch_points():
    report = _report()
    src = to_dot(report, depth=2).source
    nodes = _node_lines(src)
    # modules at depth 2, parameters inside their module's group
    assert "enc.lin" in nodes and "dec.trunk" in nodes and "dec.heads" in nodes
    assert "enc.lin.weight" not in nodes
    # branch points are their own nodes with a distinct look
    assert "BP0" in nodes and "BP1" in nodes
    assert "peripheries=2" in nodes["BP1"]
    # loss nodes kept, coloured by their loss, with values; regularizer marked
    colors = loss_colors(report)
    assert "rec_a" in nodes and colors["rec_a"] in nodes["rec_a"]
    assert "ellipse" in nodes["kl"] and "(regularizer)" in src
    # the shared trunk group is striped with the colours of the losses it reaches
    trunk = nodes["dec.trunk"]
    assert "striped" in trunk
    assert f'fillcolor="{colors["rec_a"]}:{colors["rec<b>"]}"' in trunk
    # a collapsed group uses the union of its members' reach (heads 0 and 1 -> a and b)
    assert "striped" in nodes["dec.heads"]
    assert f"{colors['rec_a']}:{colors['rec<b>']}" in nodes["dec.heads"]
    # the encoder group reaches all three losses
    assert nodes["enc.lin"].count("#") >= 3
    # parameter names and shapes in tooltips
    assert "dec.trunk.0.weight [5, 4]" in trunk
    # nodes reaching no loss are not drawn
    assert "argmax" not in src
    # top-level ops grouped into runs of equal reach: the KL run is one node
    assert src.count('label="top level') == 3  # the kl run, the rec_a run, the rec<b> run
    # non-gradient edges dashed; legend present
    assert "style=dashed" in src
    assert "cluster_legend" in src
    # nested module clusters
    assert "subgraph cluster_" in src and "label=dec " in src


def test_collapse_depth_1_and_op_level():
    report = _report()
    nodes1 = _node_lines(to_dot(report, depth=1).source)
    assert "dec" in nodes1 and "enc" in nodes1 and "dec.trunk" not in nodes1
    ops_src = to_dot(report, ops=True).source
    nodes = _node_lines(ops_src)
    assert "enc.lin.weight" in nodes and "relu" not in nodes  # the relu output is BP1
    assert "BP1" in nodes and "mm" in nodes
    assert "argmax" not in ops_src


def test_escaping_of_odd_names_gives_valid_dot():
    src = to_dot(_report(), ops=True).source
    assert "rec&lt;b&gt;" in src  # HTML legend escaped
    if HAS_DOT:
        import subprocess

        proc = subprocess.run(["dot", "-Tsvg"], input=src.encode(), capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
        ET.fromstring(proc.stdout)


def test_op_level_refused_above_limit():
    with pytest.raises(BlockfinderError, match="--depth"):
        to_dot(_report(), ops=True, max_op_nodes=5)


def test_no_graph_and_bad_extension(tmp_path):
    report = _report()
    with pytest.raises(BlockfinderError, match=r"\.svg, \.png, \.pdf or \.dot"):
        render(report, tmp_path / "x.jpg")
    report.graph = None
    with pytest.raises(BlockfinderError, match="no dependency graph"):
        render(report, tmp_path / "x.svg")


@needs_dot
def test_render_svg_png_pdf(tmp_path):
    report = _report()
    res = render(report, tmp_path / "sub" / "b.svg")
    assert res.rendered and res.path_written == tmp_path / "sub" / "b.svg" and res.dot_path is None
    root = ET.parse(res.path_written).getroot()
    assert root.tag.endswith("svg")
    text = res.path_written.read_text()
    assert "dec.trunk.0.weight" in text  # tooltip
    assert "BP0" in text
    png = render(report, tmp_path / "b.png", ops=True)
    assert png.path_written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = render(report, tmp_path / "b.pdf", depth=1)
    assert pdf.path_written.read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob("*.dot"))


def test_render_dot_format_and_missing_dot(tmp_path, monkeypatch):
    report = _report()
    res = render(report, tmp_path / "g.dot")
    assert res.rendered and res.dot_path == tmp_path / "g.dot"
    assert res.path_written.read_text().startswith("digraph")
    import blockfinder.render as r

    monkeypatch.setattr(r.shutil, "which", lambda name: None)
    res = render(report, tmp_path / "pic.svg")
    assert not res.rendered
    assert res.path_written == tmp_path / "pic.dot" and res.path_written.exists()
    assert not (tmp_path / "pic.svg").exists()
    assert "apt-get install graphviz" in res.message and "brew install graphviz" in res.message
    assert INSTALL_HINT in res.message


def _big_graph(n_modules=60, ops_per_module=100, n_losses=4) -> BlockReport:
    """~6,000 nodes: a chain of modules with parameters, fanning out to per-loss heads."""
    g = nx.DiGraph()
    losses = tuple(f"loss{i}" for i in range(n_losses))
    full = (1 << n_losses) - 1
    prev = None
    for m in range(n_modules):
        head = m >= n_modules - n_losses
        reach = 1 << (m - (n_modules - n_losses)) if head else full
        mod = f"net.block{m}.layer{m % 3}"
        g.add_node(f"p{m}", op="parameter", param=f"{mod}.weight", module=mod, shape=(8, 8),
                   reach=reach, shared=not head)  # fmt: skip
        for k in range(ops_per_module):
            name = f"m{m}o{k}"
            g.add_node(name, op="call", target="aten.mm", module=mod, shape=(8, 8), reach=reach,
                       shared=not head)  # fmt: skip
            if k == 0:
                g.add_edge(f"p{m}", name, grad=True)
                src = prev if not head else f"m{n_modules - n_losses - 1}o{ops_per_module - 1}"
                if src is not None:
                    g.add_edge(src, name, grad=True)
            else:
                g.add_edge(f"m{m}o{k - 1}", name, grad=True)
        prev = f"m{m}o{ops_per_module - 1}"
        if head:
            i = m - (n_modules - n_losses)
            g.add_node(f"L{i}", op="loss", loss=losses[i], module="", reach=1 << i)
            g.add_edge(prev, f"L{i}", grad=True)
    src = f"m{n_modules - n_losses - 1}o{ops_per_module - 1}"
    bp = BranchPoint(0, 0, "activation", "net", src, (8, 8),
                     tuple(frozenset({x}) for x in losses))  # fmt: skip
    return BlockReport(losses, (), {}, [], [bp], "synthetic", graph=g)


@needs_dot
def test_speed_collapsing_and_rendering_6000_nodes(tmp_path):
    report = _big_graph()
    assert report.graph.number_of_nodes() >= 6000
    t0 = time.perf_counter()
    to_dot(report, depth=2)
    collapse = time.perf_counter() - t0
    assert collapse < 1.0, collapse
    t0 = time.perf_counter()
    res = render(report, tmp_path / "big.svg", depth=2)
    total = time.perf_counter() - t0
    assert res.rendered
    assert total < 3.0, total  # target ~1 s; slack for loaded CI machines
    with pytest.raises(BlockfinderError, match="--depth"):
        to_dot(report, ops=True)
