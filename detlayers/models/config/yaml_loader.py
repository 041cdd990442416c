"""Reading detectron2 YAML config files safely, ``!!python/object/apply:eval`` included.

detectron2 reads a config with ``yaml.safe_load`` and, when that meets a Python tag, retries with
``yaml.unsafe_load``, which runs arbitrary code. Its model zoo uses one such tag, for arithmetic::

    SIZES: !!python/object/apply:eval ["[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]"]

Here the loader is PyYAML's safe loader plus a constructor for that one tag, which evaluates the
expression with :func:`evaluate_expression`: numbers, strings, lists and tuples, arithmetic,
comparisons, list comprehensions over their own variables, and the calls ``int``, ``float``,
``range``, ``abs``, ``round``, ``min``, ``max``, ``len`` -- nothing that can reach a name, an
attribute or the outside world. Python's own operators compute every value, so the results are
exactly ``eval``'s. Any other Python tag still raises ``yaml.constructor.ConstructorError``.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import IO, Any

import yaml

__all__ = ["load_yaml", "evaluate_expression"]

_EVAL_TAG = "tag:yaml.org,2002:python/object/apply:eval"
# Work limits of one expression: evaluation steps (nodes visited, items produced) and the size
# of an integer exponent, so that a config file cannot make the loader run for ever.
_MAX_STEPS = 1_000_000
_MAX_INT_EXPONENT = 4096

_NUMBER = (int, float)


class _Budget:
    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError(f"expression too expensive (more than {_MAX_STEPS} evaluation steps)")


def _numbers(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def checked(a: Any, b: Any) -> Any:
        if not (isinstance(a, _NUMBER) and isinstance(b, _NUMBER)):
            raise ValueError(f"arithmetic only on numbers, got {type(a).__name__} and {type(b).__name__}")
        return op(a, b)

    return checked


def _power(a: Any, b: Any) -> Any:
    if isinstance(b, int) and abs(b) > _MAX_INT_EXPONENT:
        raise ValueError(f"exponent {b} is too large")
    return a**b


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: _numbers(operator.add),
    ast.Sub: _numbers(operator.sub),
    ast.Mult: _numbers(operator.mul),
    ast.Div: _numbers(operator.truediv),
    ast.FloorDiv: _numbers(operator.floordiv),
    ast.Mod: _numbers(operator.mod),
    ast.Pow: _numbers(_power),
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}


def _range(*args: Any) -> list[int]:
    if not all(type(a) is int for a in args):
        raise ValueError(f"range() needs ints, got {args}")
    numbers = range(*args)
    if len(numbers) > _MAX_STEPS:
        raise ValueError(f"range() of {len(numbers)} items is too long")
    return list(numbers)


_CALLS: dict[str, Callable[..., Any]] = {
    "int": int, "float": float, "range": _range, "abs": abs, "round": round, "min": min, "max": max, "len": len,
}


def evaluate_expression(text: str) -> Any:
    """Evaluate a Python expression restricted to literals, arithmetic, comparisons, list
    comprehensions and a few pure builtins (see the module doc). Raises ``ValueError`` for
    anything else, naming the construct."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not a Python expression: {text!r} ({err.msg})") from None
    return _evaluate(tree.body, {}, _Budget(_MAX_STEPS))


def _evaluate(node: ast.AST, names: dict[str, Any], budget: _Budget) -> Any:
    budget.spend()
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(e, names, budget) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r} (only comprehension variables may be named)")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, names, budget), _evaluate(node.right, names, budget))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, names, budget))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _evaluate(node.left, names, budget)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, names, budget)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS and not node.keywords:
        args = [_evaluate(a, names, budget) for a in node.args]
        result = _CALLS[node.func.id](*args)
        if isinstance(result, list):
            budget.spend(len(result))
        return result
    if isinstance(node, ast.ListComp):
        out: list[Any] = []
        _comprehend(node, 0, dict(names), out, budget)
        return out
    raise ValueError(f"{type(node).__name__} is not allowed in a config expression")


def _comprehend(node: ast.ListComp, index: int, names: dict[str, Any], out: list[Any], budget: _Budget) -> None:
    if index == len(node.generators):
        out.append(_evaluate(node.elt, names, budget))
        return
    generator = node.generators[index]
    if not isinstance(generator.target, ast.Name) or generator.is_async:
        raise ValueError("comprehension targets must be plain names")
    iterable = _evaluate(generator.iter, names, budget)
    if not isinstance(iterable, (list, tuple)):
        raise ValueError(f"comprehensions iterate over lists, tuples or range(), got {type(iterable).__name__}")
    for item in iterable:
        budget.spend()
        inner = {**names, generator.target.id: item}
        if all(_evaluate(cond, inner, budget) for cond in generator.ifs):
            _comprehend(node, index + 1, inner, out, budget)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader + the arithmetic ``!!python/object/apply:eval`` tag."""


def _construct_eval(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(
            None, None, "!!python/object/apply:eval needs a [string]", node.start_mark
        )
    args = loader.construct_sequence(node, deep=True)
    if len(args) != 1 or not isinstance(args[0], str):
        raise yaml.constructor.ConstructorError(
            None, None, f"!!python/object/apply:eval needs one string argument, got {args!r}", node.start_mark
        )
    try:
        return evaluate_expression(args[0])
    except (ValueError, ArithmeticError, TypeError) as err:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot evaluate {args[0]!r}: {err}", node.start_mark
        ) from None


_ConfigLoader.add_constructor(_EVAL_TAG, _construct_eval)


def load_yaml(stream: str | IO[str]) -> Any:
    """``yaml.safe_load`` that also evaluates arithmetic ``!!python/object/apply:eval`` values."""
    return yaml.load(stream, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
