"""The model card shows any answer marker as it is, rendered by a CommonMark parser: a newline
marker is not broken inline code, a backtick does not end the code span or the code block."""

from __future__ import annotations

import html as html_lib
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from nrt_mlx.export.card import CardInputs, card_body, inline_code
from nrt_mlx.recipe import Recipe


def _body(tmp_path: Path, marker: str) -> str:
    recipe = Recipe()
    recipe.model.path = str(tmp_path)  # a local base: no Hub lookup
    recipe.rollout.marker = marker
    inputs = CardInputs(recipe, {"nrt_mlx": {"marker": marker}}, [], None, None, None, "me/x")
    return card_body(inputs)


def _marker_code(body: str) -> str:
    """The text of the inline code that follows "the answer marker" in the rendered card."""
    html = MarkdownIt("commonmark").render(body)
    match = re.search(r"the answer marker <code>(.*?)</code>", html, re.S)
    assert match, html
    return html_lib.unescape(match.group(1))


def _code_blocks(body: str) -> dict[str, str]:
    tokens = MarkdownIt("commonmark").parse(body)
    return {t.info: t.content for t in tokens if t.type == "fence"}


@pytest.mark.parametrize(
    ("marker", "shown"),
    [
        ("\nAnswer:\n", r'"\nAnswer:\n"'),  # escaped: visible, and what the snippet splits on
        ("Answer: ", '"Answer: "'),  # a trailing space would be trimmed in inline code
        ("Ans`wer", "Ans`wer"),
        ("```", "```"),
        ("<|reserved_0|>", "<|reserved_0|>"),
    ],
)
def test_marker_renders_as_one_code_span_and_the_snippet_splits_on_it(
    tmp_path: Path, marker: str, shown: str
) -> None:
    body = _body(tmp_path, marker)
    assert _marker_code(body) == shown
    blocks = _code_blocks(body)
    assert set(blocks) == {"bash", "python", "yaml"}  # no fence closed early by the marker
    split = re.search(r"text\.partition\((.*)\)\n", blocks["python"])
    assert split and eval(split.group(1)) == marker  # noqa: S307 (our own rendered literal)


@pytest.mark.parametrize("text", ["a", "a`b", "`x`", "``", " lead", "x ``` y"])
def test_inline_code_round_trips(text: str) -> None:
    html = MarkdownIt("commonmark").renderInline(inline_code(text))
    assert html == f"<code>{text}</code>"
