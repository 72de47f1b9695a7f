"""The one dump hook: per-pass graphs, op-count tables, a Markdown + HTML report, a picture.

Layout of a dump directory (file names sort in pipeline order):
    main/00.eliminate_dead_code.before.py   readable FX code, every value annotated with shape/dtype
    main/00.eliminate_dead_code.after.py
    main/op_counts.md                        op histogram before/after each pass
    main/final.py, main/final.dot (+ final.svg when graphviz `dot` is installed)
    main/final.onnx                          `graphopt dump --format onnx` only (ONNX_LAYOUT, for Netron)
    report.md, report.html                   passes, time, matches, node counts, per graph; links to
                                             every graph's final.* files

The .onnx files are written by the onnx backend's `export_program` (this layer cannot import
backends: graphopt/cli.py calls it with ONNX_LAYOUT, then `write_report` again to link them).
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import torch

from ..models.fileio import write_file_atomically
from .base import op_name

ONNX_LAYOUT = "{name}/final.onnx"      # export_program's layout argument for a dump directory
_FINAL_SUFFIXES = (".py", ".svg", ".dot", ".onnx")   # the order the report links them in


def _write_text(path: Path, text: str) -> None:
    write_file_atomically(path, text.encode("utf-8"))   # a reader never sees half a file


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

    def final_files(self, records) -> dict[str, list[str]]:
        """graph -> its final.* files present now, relative to the root (graphs in record order)."""
        graphs = list(dict.fromkeys(r.graph for r in records))
        graphs += sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name not in graphs)
        files = {g: [f"{g}/final{s}" for s in _FINAL_SUFFIXES if (self.root / g / f"final{s}").is_file()]
                 for g in graphs}
        return {g: paths for g, paths in files.items() if paths}

    def write_report(self, records, notes: dict[str, str], title: str = "graphopt compile report"):
        """report.md, report.html (linking `final_files`) and op_counts.md per graph; returns the Markdown."""
        files = self.final_files(records)
        md = render_markdown(records, notes, title, files)
        _write_text(self.root / "report.md", md)
        _write_text(self.root / "report.html", render_html(records, notes, title, files))
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


def render_markdown(records, notes: dict[str, str], title: str, files: dict[str, list[str]] | None = None) -> str:
    """files: graph -> paths relative to the report (Dumper.final_files), listed as links."""
    out = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(row) + " |" for row in _rows(records)]
    if files:
        out += ["", "## Final graphs", ""]
        out += [f"- {g}: " + ", ".join(f"[{Path(p).name}]({p})" for p in paths) for g, paths in files.items()]
    out += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in notes.items()]
    return "\n".join(out) + "\n"


def render_html(records, notes: dict[str, str], title: str, files: dict[str, list[str]] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _rows(records))
    links = "".join(f"<li>{html.escape(g)}: "
                    + ", ".join(f"<a href='{html.escape(p)}'>{html.escape(Path(p).name)}</a>" for p in paths)
                    + "</li>" for g, paths in (files or {}).items())
    items = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in notes.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            + (f"<h2>Final graphs</h2><ul>{links}</ul>" if links else "")
            + f"<h2>Notes</h2><ul>{items}</ul></body></html>\n")


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
