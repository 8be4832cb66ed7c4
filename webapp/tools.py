"""Server-side tools the gateway runs itself when the model calls them."""

from __future__ import annotations

import ast
import json
import operator

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


class ToolFailed(Exception):
    """The tool ran and failed; the message goes back to the model as the tool result."""


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ToolFailed("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    raise ToolFailed("only numbers and + - * / % ** ( ) are allowed")


def calculator(arguments: str) -> str:
    """Evaluate {"expression": "..."} arithmetic without eval()."""
    try:
        expression = json.loads(arguments)["expression"]
        if not isinstance(expression, str) or len(expression) > 200:
            raise ToolFailed("expression must be a string of at most 200 characters")
        result = _evaluate(ast.parse(expression, mode="eval").body)
    except ToolFailed:
        raise
    except (ValueError, KeyError, TypeError, SyntaxError) as exc:
        raise ToolFailed(f"bad arguments: {exc}") from None
    except (ZeroDivisionError, OverflowError) as exc:
        raise ToolFailed(str(exc)) from None
    return format(result, "g") if isinstance(result, float) else str(result)


SERVER_TOOLS = {"calculator": calculator}
