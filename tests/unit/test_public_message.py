"""What a client may see of an error: no absolute repository path, and a bounded length."""

from __future__ import annotations

from pathlib import Path

from server.servicer import MAX_DETAIL_CHARS, UndecodableRequest, parse_infer_request, public_message


def test_paths_inside_the_repository_are_shown_relative_to_it(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    message = f"cannot load {root}/digits/1/model.onnx; repository {root} is read-only"
    assert public_message(message, root) == "cannot load digits/1/model.onnx; repository <repository> is read-only"


def test_a_symlinked_repository_is_hidden_under_both_names(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    message = f"{real}/m/1/model.onnx and {link}/m/1/model.onnx"
    assert public_message(message, link) == "m/1/model.onnx and m/1/model.onnx"


def test_long_messages_keep_both_ends(tmp_path: Path) -> None:
    message = "model 'x" + "y" * 10_000 + "' is not in the repository; see RepositoryIndex"
    shown = public_message(message, tmp_path)
    assert len(shown) <= MAX_DETAIL_CHARS
    assert shown.startswith("model 'xyyy") and shown.endswith("is not in the repository; see RepositoryIndex")
    assert "characters cut" in shown


def test_undecodable_bodies_become_a_value_to_refuse() -> None:
    parsed = parse_infer_request(b"\x0f\x01\x02")
    assert isinstance(parsed, UndecodableRequest) and parsed.size == 3 and parsed.id == ""
    assert parse_infer_request(b"").model_name == ""  # an empty body is a valid (empty) message
