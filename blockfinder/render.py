"""Graphviz pictures of a :class:`~blockfinder.report.BlockReport`'s dependency graph.

Two levels of detail:

- **module level** (default): nodes grouped by the first ``depth`` components of their ``module``
  attribute (parameters with their module); ops at the top level (module ``""``) grouped into
  connected runs of equal reach; loss nodes, input nodes and branch points kept as their own nodes.
- **op level** (``ops=True``): one node per graph node; refused above ``max_op_nodes`` nodes
  (graphviz layout time grows fast: ~35 s at 6.8k nodes).

Colours: one per loss (regularizers in grey tones). A node or group that reaches several losses is
striped with their colours; a bold border marks *shared* nodes (gradients of two or more task
losses meet there); branch points have a double bold border and the label ``BP<id>``.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import graphviz

from blockfinder.atomic import atomic_write
from blockfinder.errors import BlockfinderError
from blockfinder.report import BlockReport

__all__ = [
    "FORMATS",
    "INSTALL_HINT",
    "LOSS_PALETTE",
    "REGULARIZER_PALETTE",
    "RenderResult",
    "loss_colors",
    "render",
    "to_dot",
]

FORMATS = ("svg", "png", "pdf", "dot")

# Readable with black text (ColorBrewer Set3 without its grey, then tab20's light half).
LOSS_PALETTE = (
    "#8dd3c7",
    "#fdb462",
    "#bebada",
    "#fb8072",
    "#80b1d3",
    "#b3de69",
    "#fccde5",
    "#ffed6f",
    "#bc80bd",
    "#ccebc5",
    "#ffffb3",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)
REGULARIZER_PALETTE = ("#bdbdbd", "#e0e0e0", "#969696", "#d0d0d0", "#f0f0f0", "#a8a8a8")
NO_LOSS_FILL = "#ffffff"

INSTALL_HINT = (
    "install graphviz to get pictures: 'apt-get install graphviz' (Debian/Ubuntu), "
    "'brew install graphviz' (macOS) or 'conda install -c conda-forge graphviz'"
)

_MAX_TOOLTIP_LINES = 40
_DOT_TIMEOUT_S = 300


@dataclass
class RenderResult:
    """What :func:`render` wrote.

    ``path_written``: the file written (the picture, or the ``.dot`` file when graphviz's ``dot``
    program is missing or failed); ``dot_path``: the ``.dot`` file written, if any; ``rendered``:
    the requested file was written; ``message``: one line for the user.
    """

    path_written: Path
    dot_path: Path | None
    rendered: bool
    message: str


# --------------------------------------------------------------------------------------------
# colours


def loss_colors(report: BlockReport) -> dict[str, str]:
    """One colour per loss, in ``report.losses`` order (regularizers in grey tones)."""
    regs = set(report.regularizers)
    out: dict[str, str] = {}
    ti = ri = 0
    for name in report.losses:
        if name in regs:
            out[name] = REGULARIZER_PALETTE[ri % len(REGULARIZER_PALETTE)]
            ri += 1
        else:
            out[name] = LOSS_PALETTE[ti % len(LOSS_PALETTE)]
            ti += 1
    return out


def _bits(reach: int) -> list[int]:
    out = []
    i = 0
    while reach:
        if reach & 1:
            out.append(i)
        reach >>= 1
        i += 1
    return out


# --------------------------------------------------------------------------------------------
# the view: what is drawn (independent of graphviz)


@dataclass
class _VNode:
    id: str
    kind: str  # "group", "top", "op", "param", "input", "loss", "bp"
    label: list[str]
    cluster: tuple[str, ...]
    reach: int = 0
    shared: bool = False
    loss: str | None = None
    bp: Any = None
    tooltip: list[str] = field(default_factory=list)


@dataclass
class _View:
    nodes: list[_VNode]
    edges: dict[tuple[str, str], bool]  # (src, dst) -> carries gradient


def _int(v: Any) -> int:
    try:
        return int(v) if v is not None else 0
    except (TypeError, ValueError):
        return 0


def _module_of(attrs: dict[str, Any]) -> str:
    op = attrs.get("op")
    param = attrs.get("param")
    if op in ("parameter", "buffer") and param:
        return param.rsplit(".", 1)[0] if "." in param else ""
    mod = attrs.get("module")
    return mod if isinstance(mod, str) else ""


def _short_target(target: Any) -> str:
    t = str(target) if target is not None else "?"
    for pre in ("aten.", "torch.nn.functional.", "torch.", "built-in function ", "<", "method "):
        if t.startswith(pre):
            t = t[len(pre) :]
    t = t.rstrip(">")
    if t.endswith("Backward0") or t.endswith("Backward1"):
        t = t[: -len("Backward0")]
    if t.endswith(".default"):
        t = t[: -len(".default")]
    return t or "?"


def _shape_str(shape: Any) -> str:
    if shape is None:
        return ""
    try:
        return "[" + ", ".join(str(int(s)) for s in shape) + "]"
    except (TypeError, ValueError):
        return str(shape)


def _numel(shape: Any) -> int:
    if shape is None:
        return 0
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return 0


def _human(n: int) -> str:
    if n < 1000:
        return str(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)  # pragma: no cover


def _visible(attrs: dict[str, Any]) -> bool:
    """Nodes that reach no loss (metrics, detached branches, buffers) are not drawn."""
    op = attrs.get("op")
    if op in ("loss", "input"):
        return True
    reach = attrs.get("reach")
    return reach is None or _int(reach) != 0


def _loss_label(name: str, report: BlockReport) -> list[str]:
    lines = [name]
    if name in report.regularizers:
        lines.append("(regularizer)")
    val = report.loss_values.get(name) if report.loss_values else None
    if val is not None:
        lines.append(f"= {val:.4g}")
    return lines


def _bp_lines(bp: Any, order: list[str]) -> tuple[list[str], list[str]]:
    pos = {n: i for i, n in enumerate(order)}
    streams = [" + ".join(sorted(s, key=lambda n: (pos.get(n, len(pos)), n))) for s in bp.streams]
    label = [f"BP{bp.id}", _short(bp.where, 40)]
    shp = _shape_str(bp.shape)
    if shp:
        label.append(shp)
    label.append(f"{len(streams)} streams")
    tip = [
        f"branch point BP{bp.id} ({bp.kind}) in block {bp.block}",
        f"where: {bp.where}",
        f"node: {bp.node}",
    ]
    if shp:
        tip.append(f"shape: {shp}")
    tip.append("streams:")
    tip.extend(f"  {i + 1}: {s}" for i, s in enumerate(streams))
    return label, tip


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split(".") if p) if path else ()


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def _build_view(report: BlockReport, depth: int, ops: bool, max_nodes: int) -> _View:
    g = report.graph
    if g is None:
        raise BlockfinderError("the report holds no dependency graph: nothing to draw")
    nodes_attrs = g.nodes
    bp_of = {bp.node: bp for bp in report.branch_points}
    visible = [n for n, a in g.nodes(data=True) if _visible(a)]
    visible_set = set(visible)

    if ops:
        if len(visible) > max_nodes:
            raise BlockfinderError(
                f"the op-level graph has {len(visible)} nodes, more than {max_nodes} that graphviz "
                "can lay out in reasonable time: draw it by modules instead (--depth N, e.g. "
                "--depth 2)"
            )
        return _op_view(report, visible, visible_set, bp_of)

    if depth < 1:
        raise BlockfinderError(f"--depth must be at least 1, got {depth}")

    # group key of every visible node, O(nodes + edges)
    key: dict[Any, tuple] = {}
    top_nodes: list[Any] = []
    for n in visible:
        a = nodes_attrs[n]
        op = a.get("op")
        if n in bp_of:
            key[n] = ("bp", n)
        elif op in ("loss", "input"):
            key[n] = (op, n)
        else:
            mod = _split(_module_of(a))
            if not mod:
                if op in ("parameter", "buffer"):
                    key[n] = ("param", n)
                else:
                    top_nodes.append(n)
            else:
                key[n] = ("module", ".".join(mod[:depth]))
    if top_nodes:
        top_set = set(top_nodes)
        uf = _UnionFind()
        for u, v in g.edges(top_nodes):
            if v in top_set and _int(nodes_attrs[u].get("reach")) == _int(
                nodes_attrs[v].get("reach")
            ):
                uf.union(u, v)
        for n in top_nodes:
            key[n] = ("top", uf.find(n))

    members: dict[tuple, list[Any]] = defaultdict(list)
    for n in visible:
        members[key[n]].append(n)
    if len(members) > max_nodes:
        raise BlockfinderError(
            f"the graph has {len(members)} groups at module depth {depth}, more than {max_nodes} "
            "that graphviz can lay out in reasonable time: use a smaller --depth"
        )

    ids: dict[tuple, str] = {}
    vnodes: list[_VNode] = []
    colors_order = list(report.losses)
    for i, (k, mem) in enumerate(members.items()):
        vid = f"n{i}"
        ids[k] = vid
        kind = k[0]
        if kind in ("bp", "loss", "input", "param"):
            n = k[1]
            a = nodes_attrs[n]
            vnodes.append(_single_node(vid, n, a, report, bp_of, depth, colors_order))
            continue
        reach = 0
        shared = False
        params: list[tuple[str, Any]] = []
        targets: Counter[str] = Counter()
        for n in mem:
            a = nodes_attrs[n]
            reach |= _int(a.get("reach"))
            shared = shared or bool(a.get("shared"))
            if a.get("op") in ("parameter", "buffer"):
                params.append((str(a.get("param") or n), a.get("shape")))
            else:
                targets[_short_target(a.get("target"))] += 1
        nops = sum(targets.values())
        elements = sum(_numel(s) for _, s in params)
        if kind == "module":
            path = k[1]
            label = [path]
            counts = [f"{nops} op{'s' if nops != 1 else ''}"]
            if params:
                counts.append(f"{len(params)} param{'s' if len(params) != 1 else ''}")
                counts.append(f"({_human(elements)})")
            label.append(" ".join(counts))
            cluster = _split(path)
            tip = [f"module {path}: {nops} ops, {len(params)} parameters ({elements} elements)"]
        else:  # top-level run of ops
            names = [t for t, _ in targets.most_common(3)]
            more = len(targets) - len(names)
            label = ["top level", ", ".join(names) + (f" +{more}" if more > 0 else "")]
            cluster = ()
            tip = [f"top-level ops ({nops})"]
        if params:
            tip.append("parameters:")
            tip.extend(f"  {p} {_shape_str(s)}" for p, s in params[:_MAX_TOOLTIP_LINES])
            if len(params) > _MAX_TOOLTIP_LINES:
                tip.append(f"  … {len(params) - _MAX_TOOLTIP_LINES} more")
        if targets:
            tip.append("ops: " + ", ".join(f"{t}×{c}" if c > 1 else t for t, c in targets.items()))
        tip.append("losses: " + _reach_names(reach, colors_order))
        vnodes.append(
            _VNode(
                id=vid,
                kind="group" if kind == "module" else "top",
                label=label,
                cluster=cluster,
                reach=reach,
                shared=shared,
                tooltip=tip,
            )
        )

    edges: dict[tuple[str, str], bool] = {}
    for u, v, ea in g.edges(visible, data=True):
        if v not in visible_set:
            continue
        ku, kv = key[u], key[v]
        if ku == kv:
            continue
        grad = ea.get("grad")
        grad = True if grad is None else bool(grad)
        if not grad and _is_target_feed(nodes_attrs[u], nodes_attrs[v]):
            continue
        e = (ids[ku], ids[kv])
        edges[e] = edges.get(e, False) or grad
    return _without_isolated_inputs(_View(vnodes, edges))


def _is_target_feed(src: dict[str, Any], dst: dict[str, Any]) -> bool:
    """Data (no gradient) from an input into the computation of a single loss: typically the
    target of a likelihood. Left out of module-level pictures, where it only adds clutter."""
    return src.get("op") == "input" and len(_bits(_int(dst.get("reach")))) <= 1


def _without_isolated_inputs(view: _View) -> _View:
    used = {u for u, _ in view.edges} | {v for _, v in view.edges}
    view.nodes = [v for v in view.nodes if v.kind != "input" or v.id in used]
    return view


def _reach_names(reach: int, order: list[str]) -> str:
    names = [order[i] for i in _bits(reach) if i < len(order)]
    return ", ".join(names) if names else "none"


def _single_node(
    vid: str,
    n: Any,
    a: dict[str, Any],
    report: BlockReport,
    bp_of: dict[Any, Any],
    depth: int | None,
    order: list[str],
) -> _VNode:
    op = a.get("op")
    reach = _int(a.get("reach"))
    shared = bool(a.get("shared"))
    mod = _split(_module_of(a))
    cluster = mod if depth is None else mod[:depth]
    shp = _shape_str(a.get("shape"))
    if n in bp_of:
        label, tip = _bp_lines(bp_of[n], order)
        return _VNode(vid, "bp", label, cluster, reach, True, bp=bp_of[n], tooltip=tip)
    if op == "loss":
        name = str(a.get("loss") or n)
        return _VNode(
            vid,
            "loss",
            _loss_label(name, report),
            (),
            reach,
            False,
            loss=name,
            tooltip=[f"loss {name}"],
        )
    if op == "input":
        target = a.get("target")
        label = ["input", _short(str(n if target in (None, "input") else target), 30)]
        if shp:
            label.append(shp)
        return _VNode(vid, "input", label, (), reach, False, tooltip=[f"input {n} {shp}"])
    if op in ("parameter", "buffer"):
        pname = str(a.get("param") or n)
        label = [_short(pname, 40)]
        if shp:
            label.append(shp)
        tip = [f"{op} {pname} {shp}", "losses: " + _reach_names(reach, order)]
        return _VNode(vid, "param", label, cluster, reach, shared, tooltip=tip)
    label = [_short_target(a.get("target"))]
    if shp:
        label.append(shp)
    tip = [
        f"{a.get('target')} {shp}",
        f"module: {'.'.join(mod) or '(top level)'}",
        f"node: {n}",
        "losses: " + _reach_names(reach, order),
    ]
    return _VNode(vid, "op", label, cluster, reach, shared, tooltip=tip)


def _op_view(report: BlockReport, visible: list, visible_set: set, bp_of: dict) -> _View:
    g = report.graph
    assert g is not None
    ids = {n: f"n{i}" for i, n in enumerate(visible)}
    order = list(report.losses)
    vnodes = [_single_node(ids[n], n, g.nodes[n], report, bp_of, None, order) for n in visible]
    edges: dict[tuple[str, str], bool] = {}
    for u, v, ea in g.edges(visible, data=True):
        if v not in visible_set:
            continue
        grad = ea.get("grad")
        e = (ids[u], ids[v])
        edges[e] = edges.get(e, False) or (True if grad is None else bool(grad))
    return _without_isolated_inputs(_View(vnodes, edges))


# --------------------------------------------------------------------------------------------
# graphviz


def _esc(text: str) -> str:
    """Escape user text for a quoted DOT string (backslashes are DOT escape sequences)."""
    return str(text).replace("\\", "\\\\").replace('"', "'")


def _lines(lines: list[str]) -> graphviz.quoting.NoHtml:
    return graphviz.nohtml("\\n".join(_esc(s) for s in lines if s != ""))


def _style(v: _VNode, colors: list[str], color_map: dict[str, str]) -> dict[str, str]:
    bits = [i for i in _bits(v.reach) if i < len(colors)]
    cols = [colors[i] for i in bits]
    attrs: dict[str, str] = {}
    if v.kind == "loss":
        attrs.update(shape="ellipse", style="filled", fillcolor=cols[0] if cols else NO_LOSS_FILL)
        if v.loss is not None and v.loss in color_map:
            attrs["fillcolor"] = color_map[v.loss]
        attrs["penwidth"] = "1.5"
        return attrs
    if v.kind == "input":
        attrs.update(shape="invhouse", style="filled", fillcolor="#f7f7f7")
        return attrs
    attrs["shape"] = "box"
    styles: list[str] = []
    if len(cols) >= 2:
        styles.append("striped")
        attrs["fillcolor"] = ":".join(cols)
    else:
        styles.append("filled")
        attrs["fillcolor"] = cols[0] if cols else NO_LOSS_FILL
    if v.kind == "bp":
        attrs["peripheries"] = "2"
        attrs["penwidth"] = "2.5"
        attrs["color"] = "#b30000"
        attrs["fontname"] = "Helvetica-Bold"
    elif v.shared:
        attrs["penwidth"] = "2.5"
    elif len(cols) >= 2:
        styles.append("dashed")
    if v.kind == "param":
        attrs["fontname"] = "Helvetica-Oblique"
    attrs["style"] = ",".join(styles)
    return attrs


def _cluster_tree(nodes: list[_VNode]) -> dict:
    """Nested dict: {"nodes": [...], "children": {component: subtree}}."""
    root: dict = {"nodes": [], "children": {}}
    for v in nodes:
        t = root
        for comp in v.cluster:
            t = t["children"].setdefault(comp, {"nodes": [], "children": {}})
        t["nodes"].append(v)
    return root


def _emit_tree(
    g: graphviz.Digraph,
    tree: dict,
    path: tuple[str, ...],
    colors: list[str],
    color_map: dict[str, str],
    counter: list[int],
) -> None:
    for v in tree["nodes"]:
        _emit_node(g, v, colors, color_map)
    for comp, sub in tree["children"].items():
        sub_path = (*path, comp)
        n_items = len(sub["nodes"]) + len(sub["children"])
        if n_items <= 1:  # a cluster around a single item adds nothing: inline it
            _emit_tree(g, sub, sub_path, colors, color_map, counter)
            continue
        counter[0] += 1
        with g.subgraph(name=f"cluster_{counter[0]}") as c:
            c.attr(
                label=_esc(".".join(sub_path)),
                tooltip=_esc(".".join(sub_path)),
                style="rounded",
                color="#9e9e9e",
                fontcolor="#424242",
                fontsize="10",
                labeljust="l",
            )
            _emit_tree(c, sub, sub_path, colors, color_map, counter)


def _emit_node(
    g: graphviz.Digraph, v: _VNode, colors: list[str], color_map: dict[str, str]
) -> None:
    attrs = _style(v, colors, color_map)
    tip = v.tooltip[: _MAX_TOOLTIP_LINES + 4] if v.tooltip else v.label
    if "striped" in attrs.get("style", ""):
        # the stripes frame a white label: readable however many losses the node reaches
        label: str = _html_label(v.label)
        attrs["margin"] = "0.14,0.09"
    else:
        label = _lines(v.label)
    g.node(v.id, label=label, tooltip=_lines(tip), **attrs)


def _html_label(lines: list[str]) -> str:
    body = "<br/>".join(html.escape(s) for s in lines if s != "")
    return (
        '<<table border="0" cellborder="0" cellspacing="0" cellpadding="2" bgcolor="white">'
        f"<tr><td>{body}</td></tr></table>>"
    )


def _legend(g: graphviz.Digraph, report: BlockReport, colors: dict[str, str]) -> None:
    with g.subgraph(name="cluster_legend") as c:
        c.attr(label="legend", style="rounded", color="#bdbdbd", fontsize="10", labeljust="l")
        rows = []
        regs = set(report.regularizers)
        for name in report.losses:
            role = " (regularizer)" if name in regs else ""
            rows.append(
                f'<tr><td bgcolor="{colors[name]}" width="18"> </td>'
                f'<td align="left">{html.escape(name)}{role}</td></tr>'
            )
        table = (
            '<<table border="0" cellborder="1" cellspacing="2" cellpadding="3">'
            '<tr><td colspan="2"><b>losses</b></td></tr>' + "".join(rows) + "</table>>"
        )
        c.node("legend_losses", label=table, shape="plaintext", tooltip="one colour per loss")
        tasks = [colors[n] for n in report.losses if n not in regs] or list(LOSS_PALETTE[:2])
        stripes = ":".join((tasks * 2)[:2])
        c.node(
            "legend_shared",
            label=_html_label(["shared", "(stripes: the losses", "it reaches)"]),
            shape="box",
            style="striped",
            fillcolor=stripes,
            penwidth="2.5",
            margin="0.14,0.09",
            tooltip="shared: gradients of several losses meet here",
        )
        c.node(
            "legend_bp",
            label="BP<id>\\nbranch point",
            shape="box",
            style="filled",
            fillcolor="#ffffff",
            peripheries="2",
            penwidth="2.5",
            color="#b30000",
            fontname="Helvetica-Bold",
            tooltip="branch point: the gradient streams of different losses join here",
        )
        c.edge("legend_losses", "legend_shared", style="invis")
        c.edge("legend_shared", "legend_bp", style="invis")


def to_dot(
    report: BlockReport, depth: int = 2, ops: bool = False, *, max_op_nodes: int = 3000
) -> graphviz.Digraph:
    """The dependency graph of ``report`` as a ``graphviz.Digraph`` (see the module docstring)."""
    view = _build_view(report, depth, ops, max_op_nodes)
    color_map = loss_colors(report)
    colors = [color_map[n] for n in report.losses]

    g = graphviz.Digraph(name="blocks")
    g.attr(
        rankdir="TB",
        fontname="Helvetica",
        newrank="true",
        compound="true",
        tooltip="impartiality blocks",
        label=_esc(_title(report, depth, ops)),
        labelloc="t",
        fontsize="12",
    )
    g.attr("node", fontname="Helvetica", fontsize="10", margin="0.08,0.04")
    g.attr("edge", color="#616161", arrowsize="0.6")

    tree = _cluster_tree([v for v in view.nodes if v.kind not in ("loss", "input")])
    _emit_tree(g, tree, (), colors, color_map, [0])
    losses = [v for v in view.nodes if v.kind == "loss"]
    inputs = [v for v in view.nodes if v.kind == "input"]
    if losses:
        with g.subgraph() as s:
            s.attr(rank="sink")
            for v in losses:
                _emit_node(s, v, colors, color_map)
    if inputs:
        with g.subgraph() as s:
            s.attr(rank="source")
            for v in inputs:
                _emit_node(s, v, colors, color_map)
    for (u, v), grad in view.edges.items():
        if grad:
            g.edge(u, v)
        else:
            g.edge(u, v, style="dashed", color="#bdbdbd", tooltip="no gradient")
    _legend(g, report, color_map)
    return g


def _title(report: BlockReport, depth: int, ops: bool) -> str:
    level = "op level" if ops else f"module depth {depth}"
    nb = len(report.blocks)
    nbp = len(report.branch_points)
    return (
        f"impartiality blocks: {nb} block{'s' if nb != 1 else ''}, "
        f"{nbp} branch point{'s' if nbp != 1 else ''} ({level}, capture: {report.capture})"
    )


# --------------------------------------------------------------------------------------------
# writing


def render(
    report: BlockReport,
    path: str | os.PathLike[str],
    *,
    depth: int = 2,
    ops: bool = False,
    max_op_nodes: int = 3000,
) -> RenderResult:
    """Draw ``report`` into ``path`` (format from its extension: svg, png, pdf or dot).

    Without graphviz's ``dot`` program the ``.dot`` source is written next to ``path`` instead
    and ``rendered`` is False (``message`` says how to install graphviz).
    """
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        shown = out.suffix or "no extension"
        raise BlockfinderError(
            f"cannot write a picture as '{shown}' ({out}): name the output .svg, .png, .pdf or .dot"
        )
    g = to_dot(report, depth, ops, max_op_nodes=max_op_nodes)
    source = g.source.encode("utf-8")
    if fmt == "dot":
        atomic_write(out, source)
        return RenderResult(out, out, True, f"wrote {out}")
    dot_path = out.with_suffix(".dot")
    dot_exe = shutil.which("dot")
    if dot_exe is None:
        return _fallback(out, dot_path, source, "was not found")
    try:
        proc = subprocess.run(
            [dot_exe, f"-T{fmt}"], input=source, capture_output=True, timeout=_DOT_TIMEOUT_S
        )
    except OSError:
        return _fallback(out, dot_path, source, "could not be run")
    except subprocess.TimeoutExpired:
        atomic_write(dot_path, source)
        return RenderResult(
            dot_path,
            dot_path,
            False,
            f"graphviz's 'dot' took more than {_DOT_TIMEOUT_S} s on this graph, so {dot_path} was "
            f"written instead of {out}: use a smaller --depth",
        )
    if proc.returncode != 0 or not proc.stdout:
        atomic_write(dot_path, source)
        err = " ".join(proc.stderr.decode("utf-8", "replace").split())[:200]
        return RenderResult(
            dot_path,
            dot_path,
            False,
            f"graphviz's 'dot' failed ({err or f'exit status {proc.returncode}'}), so {dot_path} "
            f"was written instead of {out}",
        )
    data = proc.stdout
    atomic_write(out, data)
    return RenderResult(out, None, True, f"wrote {out}")


def _fallback(out: Path, dot_path: Path, source: bytes, why: str) -> RenderResult:
    atomic_write(dot_path, source)
    fmt = out.suffix.lstrip(".")
    return RenderResult(
        dot_path,
        dot_path,
        False,
        f"graphviz's 'dot' program {why}, so {dot_path} was written instead of {out}; "
        f"{INSTALL_HINT}; then run: dot -T{fmt} {dot_path} -o {out}",
    )
