"""Sphinx extension of the lllm book: fills the API page with every lllm module that exists.

book/api.md holds the marker line below; on reading that page, the marker is replaced by one
section per module of `lllm.apps.book.API_MODULES` that can be found, each with an autosummary table and
its autodoc'd members. A module not written yet is left out; one that exists but fails to import
or document raises a warning, which fails the -W build.

lllm's docstrings are plain text with tensor shapes ("(d_out, *x.shape)", "|value|"), not
reStructuredText, so the characters that RST would read as inline markup are escaped before
autodoc parses them; ``double-backtick literals`` and literal blocks after "::" are kept.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

MARKER = "<!-- lllm-api-modules -->"
# |substitution|, name_ references and unbalanced * (as in "*x.shape" or "**kw"): RST markup that
# plain-text docstrings use literally. Balanced *emphasis* and **strong** are meant, and kept.
_RST_INLINE = re.compile(r"(?<!\\)[*|]|(?<=\w)_(?=\W|$)")
_EMPHASIS = re.compile(r"(?<![\w*\\])(\*\*?)[^\s*](?:[^*]*?[^\s*\\])?\1(?![\w*])")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+\.) ")


def _public_names(module_name: str) -> list[str]:
    """Classes and functions defined in the module (not imported into it), in source order."""
    module = importlib.import_module(module_name)
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.append((inspect.getsourcelines(obj)[1], name))
    return [name for _, name in sorted(names)]


def api_markdown(modules: list[str]) -> str:
    """MyST markdown documenting `modules`: an index table, then per module its docstring, a table and members."""
    blocks = ["```{eval-rst}", ".. autosummary::", "   :nosignatures:", ""]
    blocks += [f"   {name}" for name in modules]
    blocks += ["```", ""]
    for name in modules:
        members = _public_names(name)
        blocks += [f"## `{name}`", "", "```{eval-rst}", f".. automodule:: {name}", "", f".. currentmodule:: {name}", ""]
        if members:
            blocks += [".. autosummary::", "   :nosignatures:", ""] + [f"   {member}" for member in members] + [""]
        module = importlib.import_module(name)
        for member in members:
            kind = "autoclass" if inspect.isclass(getattr(module, member)) else "autofunction"
            blocks += [f".. {kind}:: {member}"]
            if kind == "autoclass":
                blocks += ["   :members:", "   :show-inheritance:"]
            blocks.append("")
        blocks += ["```", ""]
    return "\n".join(blocks)


def _fill_api_page(app, docname: str, source: list[str]) -> None:
    """source-read handler: replace the marker of the API page by the generated module sections."""
    if MARKER not in source[0]:
        return
    from lllm.apps.book import API_MODULES

    present = [name for name in API_MODULES if importlib.util.find_spec(name) is not None]
    source[0] = source[0].replace(MARKER, api_markdown(present))


def _escape_inline_markup(text: str) -> str:
    """`text` with RST inline-markup characters backslash-escaped, except in balanced *emphasis*."""
    out, last = [], 0
    for match in _EMPHASIS.finditer(text):
        out += [_RST_INLINE.sub(lambda m: "\\" + m.group(0), text[last:match.start()]), match.group(0)]
        last = match.end()
    out.append(_RST_INLINE.sub(lambda m: "\\" + m.group(0), text[last:]))
    return "".join(out)


def plain_docstring(lines: list[str]) -> list[str]:
    """Docstring lines as RST that shows what was written.

    Inline markup is escaped outside ``literals`` and "::" literal blocks, and blank lines are put
    around a list that touches a paragraph (markdown allows that, RST does not).
    """
    out: list[str] = []
    block_indent = None  # indentation of the line that opened a literal block
    list_indent = None  # indentation of the bullets of the list being read
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and (not line.strip() or indent > block_indent):
            out.append(line)
            continue
        block_indent = None
        touches = bool(out) and bool(out[-1].strip())
        if _BULLET.match(line):
            if touches and list_indent is None:  # the list starts right under a paragraph line
                out.append("")
            list_indent = indent
        elif line.strip() and list_indent is not None and indent <= list_indent:
            if touches:  # a paragraph starts right under the list
                out.append("")
            list_indent = None
        parts = line.split("``")
        parts[::2] = [_escape_inline_markup(p) for p in parts[::2]]  # even parts are outside literals
        out.append("``".join(parts))
        if line.rstrip().endswith("::"):
            block_indent = indent
    return out


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """autodoc-process-docstring handler (before napoleon's): escape in place."""
    lines[:] = plain_docstring(lines)


def _api_page_is_always_outdated(app, env, added, changed, removed) -> list[str]:
    """env-get-outdated handler: re-read the API page on every build, since docstrings live outside the book."""
    return [docname for docname in env.found_docs if docname == "api"]


def setup(app):
    """Register the API page filler; prefer the lllm of the checkout this book lives in."""
    checkout = Path(app.srcdir).resolve().parent
    if (checkout / "lllm" / "__init__.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    app.connect("source-read", _fill_api_page)
    app.connect("env-get-outdated", _api_page_is_always_outdated)
    app.setup_extension("sphinx.ext.autodoc")
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
