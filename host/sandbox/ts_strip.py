"""TypeScript to JavaScript by type stripping: the types become spaces, nothing else moves.

Why stripping, and why this way: a TypeScript agent is JavaScript with type annotations,
and the types mean nothing at run time. Replacing every type-only piece of the source with
spaces (newlines kept) leaves valid JavaScript in which every remaining character sits at
its original line and column, so a stack trace from QuickJS (``at main (agent.ts:7:11)``)
points at the TypeScript source with no source map to apply. This is the approach of
Node's ``--experimental-strip-types`` and of ts-blank-space. The parser is tree-sitter's
TypeScript grammar, from PyPI (``tree-sitter``, ``tree-sitter-typescript``): esbuild's npm
package needs Node, and the esbuild wheels on PyPI expose only a fixed JSX transform.

What needs code generation rather than erasure (``enum``, ``namespace``, constructor
parameter properties, decorators) is refused with the file, line and column, as in Node's
strip-only mode; so is a syntax error.
"""

from __future__ import annotations

from typing import Any

from host.errors import ToolchainError

#: Nodes that are types and nothing else: erased whole.
_ERASE = frozenset({
    "type_annotation", "type_parameters", "type_arguments", "interface_declaration", "type_alias_declaration",
    "accessibility_modifier", "override_modifier", "implements_clause", "ambient_declaration",
    "function_signature", "abstract_method_signature", "index_signature", "opting_type_annotation",
    "asserts_annotation", "type_predicate_annotation",
})
#: Nodes whose JavaScript meaning needs generated code: refused.
_REFUSE = {
    "enum_declaration": "an enum (use a const object)",
    "internal_module": "a namespace",
    "module": "a namespace",
    "decorator": "a decorator",
}
#: Keyword tokens that are TypeScript-only where they appear as children of these nodes.
_TOKENS = {
    "public_field_definition": {"readonly", "?", "!", "declare", "abstract"},
    "optional_parameter": {"?"},
    "method_definition": {"?", "abstract"},
    "class_declaration": {"abstract"},
    "abstract_class_declaration": {"abstract"},
    "non_null_expression": {"!"},
    "variable_declarator": {"!"},
}


def _parser() -> Any:
    try:
        import tree_sitter
        import tree_sitter_typescript
    except ImportError as exc:  # pragma: no cover - an install without the dependency
        raise ToolchainError("TypeScript needs tree-sitter: run `pip install tree-sitter tree-sitter-typescript` "
                             "(or reinstall torpor)") from exc
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_typescript.language_typescript()))


def _where(filename: str, node: Any) -> str:
    row, col = node.start_point
    return f"{filename}:{row + 1}:{col + 1}"


def strip_types(source: str, filename: str = "agent.ts") -> str:
    """``source`` with its types blanked out (same length in lines and columns)."""
    data = bytearray(source.encode("utf-8"))
    tree = _parser().parse(bytes(data))
    spans: list[tuple[int, int]] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        kind = node.type
        if node.is_error or node.is_missing:
            what = f"missing {kind}" if node.is_missing else "unexpected input"
            raise ToolchainError(f"TypeScript compilation failed: {_where(filename, node)}: SyntaxError: {what}")
        if kind in _REFUSE:
            raise ToolchainError(f"TypeScript compilation failed: {_where(filename, node)}: {_REFUSE[kind]} needs "
                                 "code generation, which type stripping does not do")
        if kind == "required_parameter" and any(c.type == "accessibility_modifier" for c in node.children):
            raise ToolchainError(f"TypeScript compilation failed: {_where(filename, node)}: a constructor parameter "
                                 "property needs code generation, which type stripping does not do")
        if kind in _ERASE or _type_only_statement(node):
            spans.append((node.start_byte, node.end_byte))
            continue
        if kind in ("as_expression", "satisfies_expression"):
            # Keep the expression, erase ` as T` / ` satisfies T`.
            first = node.children[0]
            spans.append((first.end_byte, node.end_byte))
            stack.append(first)
            continue
        if kind == "import_specifier" and node.children and node.children[0].type == "type":
            spans.append(_with_comma(node))
            continue
        tokens = _TOKENS.get(kind)
        for child in node.children:
            if tokens and child.type in tokens and child.child_count == 0:
                spans.append((child.start_byte, child.end_byte))
            else:
                stack.append(child)
    erased = bytearray(len(data))
    for start, end in spans:
        erased[start:end] = b"\x01" * (end - start)
    # One space per erased character (not per byte): columns count characters.
    out: list[str] = []
    pos = 0
    for ch in source:
        n = len(ch.encode("utf-8"))
        out.append(ch if not erased[pos] or ch in "\r\n" else " ")
        pos += n
    return "".join(out)


def _type_only_statement(node: Any) -> bool:
    """``import type ...``, ``export type {...}``, ``export interface``/``type`` declarations."""
    if node.type == "import_statement":
        return any(c.type == "type" for c in node.children)
    if node.type == "export_statement":
        kids = [c.type for c in node.children]
        if "type" in kids:
            return True
        decl = node.child_by_field_name("declaration")
        return decl is not None and decl.type in ("interface_declaration", "type_alias_declaration",
                                                  "ambient_declaration", "function_signature")
    return False


def _with_comma(node: Any) -> tuple[int, int]:
    """A specifier's span with the comma after it (or before it, when it is the last)."""
    nxt = node.next_sibling
    if nxt is not None and nxt.type == ",":
        return node.start_byte, nxt.end_byte
    prev = node.prev_sibling
    if prev is not None and prev.type == ",":
        return prev.start_byte, node.end_byte
    return node.start_byte, node.end_byte
