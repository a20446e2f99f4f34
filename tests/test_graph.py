"""The lineage picture: layout keeps a branch on one row; Mermaid, SVG and PNG come out."""

import pytest
import torch
from safetensors.torch import save_file

from skillbank.api import Bank
from skillbank.errors import ValidationError
from skillbank.lineage.graph import Node, layout, mermaid


def test_layout_first_child_continues_the_row():
    nodes = [Node(0, None, None, None), Node(1, 0, "a", "0.8"), Node(2, 1, "b", "0.5"),
             Node(3, 1, "c", "0.9"), Node(4, 3, "d", "1")]
    pos = layout(nodes)
    assert pos[0] == (0, 0) and pos[1] == (1, 0) and pos[2] == (2, 0)
    assert pos[3] == (2, 1) and pos[4] == (3, 1)


def test_layout_scales_to_long_chains():
    nodes = [Node(0, None, None, None)] + [Node(i, i - 1, f"s{i}", "0.8") for i in range(1, 80)]
    pos = layout(nodes)
    assert {r for _, r in pos.values()} == {0} and pos[79] == (79, 0)


def test_bank_graph_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"vision.w": torch.randn(32, 32, generator=g), "action.b": torch.randn(4, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    bank, _ = Bank.init(tmp_path / "bank", str(tmp_path / "base.safetensors"))
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(ft, tmp_path / "ft.safetensors")
    bank.add_skill("stack-cups", str(tmp_path / "ft.safetensors"), 0.8)
    bank.record_eval("v1", "metaworld:x", "OOD", 0.7)
    text = bank.graph()["mermaid"]
    assert "v0 --> v1" in text and "stack-cups" in text and "OOD 0.70" in text and "[main]" in text
    assert (tmp_path / "g.svg").exists() is False
    bank.graph(str(tmp_path / "g.svg"))
    bank.graph(str(tmp_path / "g.png"))
    bank.graph(str(tmp_path / "g.mmd"))
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "g.mmd").read_text() == text
    with pytest.raises(ValidationError):
        bank.graph(str(tmp_path / "g.pdf"))
    bank.close()


def test_mermaid_escapes_quotes():
    assert '"' not in mermaid([Node(0, None, 'say "hi"', None)]).split('["')[1].split('"]')[0]
