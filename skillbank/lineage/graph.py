"""The version DAG as a picture: Mermaid text, or SVG/PNG drawn with matplotlib.

Layout: a version's column is its depth from the base; a first child stays in its parent's row and
every further child opens a new row below, so each branch reads as one line left to right, even
with 50+ versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Node:
    id: int
    parent: int | None
    skill: str | None
    alpha: str | None
    refs: list[str] = field(default_factory=list)
    evals: dict[str, float] = field(default_factory=dict)  # split -> best recorded value
    keyframe: bool = False

    @property
    def label(self) -> str:
        head = f"v{self.id}" + (f" {self.skill}" if self.skill else " base")
        lines = [head]
        if self.alpha:
            lines.append(f"alpha {self.alpha}")
        if self.evals:
            lines.append(" ".join(f"{k} {v:.2f}" for k, v in sorted(self.evals.items())))
        return "\n".join(lines)


def layout(nodes: list[Node]) -> dict[int, tuple[int, int]]:
    """(column, row) of every version."""
    children: dict[int | None, list[int]] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        children.setdefault(n.parent, []).append(n.id)
    pos: dict[int, tuple[int, int]] = {}
    next_row = 0
    stack = [(root, 0, None) for root in reversed(children.get(None, []))]
    while stack:
        vid, depth, row = stack.pop()
        if row is None:
            row, next_row = next_row, next_row + 1
        pos[vid] = (depth, row)
        kids = children.get(vid, [])
        # the first child continues this row; push it last so it is laid out first
        for i, kid in reversed(list(enumerate(kids))):
            stack.append((kid, depth + 1, row if i == 0 else None))
    return pos


def mermaid(nodes: list[Node]) -> str:
    lines = ["graph LR"]
    for n in sorted(nodes, key=lambda n: n.id):
        text = n.label.replace("\n", "<br/>").replace('"', "'")
        if n.refs:
            text += "<br/>[" + ", ".join(n.refs) + "]"
        lines.append(f'  v{n.id}["{text}"]')
        if n.parent is not None:
            lines.append(f"  v{n.parent} --> v{n.id}")
    return "\n".join(lines) + "\n"


def draw(nodes: list[Node], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = layout(nodes)
    cols = max(c for c, _ in pos.values()) + 1
    rows = max(r for _, r in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(max(4.0, 2.1 * cols), max(1.8, 1.25 * rows)), dpi=110)
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.parent is not None and n.parent in pos:
            (x0, y0), (x1, y1) = pos[n.parent], pos[n.id]
            ax.annotate("", xy=(x1 - 0.36, -y1), xytext=(x0 + 0.36, -y0),
                        arrowprops={"arrowstyle": "->", "color": "#777", "lw": 1.0,
                                    "connectionstyle": "angle,angleA=0,angleB=90" if y0 != y1 else "arc3"})
    for vid, (x, y) in pos.items():
        n = by_id[vid]
        face = "#e8f0fe" if n.skill else "#eeeeee"
        ax.text(x, -y, n.label, ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round,pad=0.35", "fc": face, "ec": "#2b6cb0" if n.keyframe else "#999",
                      "lw": 1.6 if n.keyframe else 0.8})
        if n.refs:
            ax.text(x, -y - 0.38, ", ".join(n.refs), ha="center", va="top", fontsize=6.5, color="#b7791f",
                    fontweight="bold")
    ax.set_xlim(-0.6, cols - 0.4)
    ax.set_ylim(-rows + 0.3, 0.6)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
