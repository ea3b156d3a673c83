"""The JSON text of every command's ``--format json``: the text ``json.dumps`` gives, however large."""

from __future__ import annotations

import json

import pytest

from ostate import render


def test_json_text_is_the_text_of_json_dumps_across_many_joins(monkeypatch):
    monkeypatch.setattr(render, "_JOIN_EVERY", 7)  # the pieces of this small table are joined many times
    data = {"rows": [{"name": f"p{i}", "x": i / 3, "none": None, "shape": [i, 2]} for i in range(50)], "é": "→"}
    assert render.json_text(data) == json.dumps(data, indent=2, allow_nan=False) + "\n"
    assert render.json_text([]) == "[]\n"
    with pytest.raises(ValueError):
        render.json_text({"x": float("nan")})
