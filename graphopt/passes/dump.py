"""The one dump hook: per-pass graphs, op-count tables, a Markdown + HTML report, a picture.

Layout of a dump directory (file names sort in pipeline order):
    main/00.eliminate_dead_code.before.py   readable FX code, every value annotated with shape/dtype
    main/00.eliminate_dead_code.after.py
    main/op_counts.md                        op histogram before/after each pass
    main/final.dot (+ final.svg when graphviz `dot` is installed)
    report.md, report.html                   passes, time, matches, node counts, per graph
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import networkx as nx
import torch

from .base import op_name


def _write_text(path: Path, text: str) -> None:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)


class Dumper:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write_graph(self, graph: str, index: int, pass_name: str, when: str, gm: torch.fx.GraphModule):
        _write_text(self.root / graph / f"{index:02d}.{pass_name}.{when}.py", readable(gm))

    def write_captured(self, graph: str, gm: torch.fx.GraphModule):
        _write_text(self.root / graph / "capture.py", readable(gm))

    def write_final(self, graph: str, gm: torch.fx.GraphModule) -> str:
        """final.py, final.dot, and final.svg when `dot` exists; returns a note for the report."""
        _write_text(self.root / graph / "final.py", readable(gm))
        dot_path = self.root / graph / "final.dot"
        _write_text(dot_path, to_dot(fx_to_networkx(gm)))
        dot = shutil.which("dot")
        if dot is None:
            return "graphviz `dot` is not installed: final.dot written, no picture rendered"
        svg = dot_path.with_suffix(".svg")
        subprocess.run([dot, "-Tsvg", str(dot_path), "-o", str(svg)], check=True, timeout=120)
        return f"picture: {graph}/final.svg"

    def write_report(self, records, notes: dict[str, str], title: str = "graphopt compile report"):
        md = render_markdown(records, notes, title)
        _write_text(self.root / "report.md", md)
        _write_text(self.root / "report.html", render_html(records, notes, title))
        for graph in sorted({r.graph for r in records}):
            _write_text(self.root / graph / "op_counts.md", render_op_counts([r for r in records if r.graph == graph]))
        return md


def fx_to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        label = node.name if node.op in ("placeholder", "output", "get_attr") else op_name(node.target)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            label += f"\\n{tuple(val.shape)} {str(val.dtype).replace('torch.', '')}"
        g.add_node(node.name, label=label, op=node.op)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def to_dot(g: nx.DiGraph) -> str:
    shapes = {"placeholder": "invhouse", "output": "house", "get_attr": "note"}
    lines = ["digraph G {", "  rankdir=TB; node [fontsize=9, shape=box];"]
    for n, data in g.nodes(data=True):
        label = str(data["label"]).replace('"', "'")
        lines.append(f'  "{n}" [label="{label}", shape={shapes.get(data["op"], "box")}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in g.edges()]
    return "\n".join(lines + ["}"]) + "\n"


def _rows(records):
    for r in records:
        status = "off" if not r.ran else ("changed" if r.modified else "no match")
        err = "" if r.max_error is None else f"{r.max_error:.2e}"
        yield [r.graph, r.phase, r.name, status, str(r.matches), f"{r.seconds * 1e3:.1f}",
               str(r.nodes_before), str(r.nodes_after), err]


HEADER = ["graph", "phase", "pass", "status", "matches", "ms", "nodes before", "nodes after", "verify max err"]


def render_markdown(records, notes: dict[str, str], title: str) -> str:
    out = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(row) + " |" for row in _rows(records)]
    out += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(out) + "\n"


def render_html(records, notes: dict[str, str], title: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _rows(records))
    items = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in notes.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            f"<ul>{items}</ul></body></html>\n")


def render_op_counts(records) -> str:
    out = []
    for r in records:
        if not r.ran:
            continue
        ops = sorted(set(r.ops_before) | set(r.ops_after))
        changed = [o for o in ops if r.ops_before.get(o, 0) != r.ops_after.get(o, 0)]
        out += [f"## {r.name}", "", "| op | before | after |", "|---|---|---|"]
        out += [f"| {o} | {r.ops_before.get(o, 0)} | {r.ops_after.get(o, 0)} |" for o in (changed or ops[:0])]
        if not changed:
            out.append("| (no op count changed) | | |")
        out.append("")
    return "\n".join(out)
