"""Which computations read the expert weight stacks of a traced graph: the check behind "this graph
reads only the routed experts" (README's target table; tests/test_routed.py).

A read is *routed* when only experts some row picked can be read, each only for the rows that
picked it:
- in a torch.export program (AOTInductor): a stack (``w_gate``, ``w_up``, ``w_down``, ``[E, ...]``)
  is used only by ``select(stack, 0, e)`` (a view of one expert) whose every use is a matmul over
  a data-dependent number of rows (the rows ``nonzero`` found routed to that expert), or by an
  index of the stack with the router's top-k expert ids (the gathered form);
- in an ONNX graph: a stack initializer feeds only a routed MoE node (``com.microsoft::MoE`` /
  ``QMoE``, tandem's TensorRT plugin op) or a ``Gather`` whose indices come from the router's
  ``TopK``.
Anything else (a ``bmm``/``MatMul`` over every expert: the dense form) is an unrouted read.
"""

from __future__ import annotations

from collections.abc import Iterable

from tandem.compiler.tensorrt_moe import DOWN, PLUGIN_NAMESPACE, UP

EXPERT_STACKS = ("w_gate", "w_up", "w_down")
# Ops that evaluate only the routed experts themselves: a read by one of these is routed.
ROUTED_ONNX_OPS = frozenset(
    {("com.microsoft", "MoE"), ("com.microsoft", "QMoE"), (PLUGIN_NAMESPACE, UP), (PLUGIN_NAMESPACE, DOWN)}
)


def _is_expert_stack(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_STACKS


def _data_dependent_rows(node) -> bool:
    """Whether a traced tensor's first dimension is an unbacked (data-dependent) size."""
    import torch

    value = node.meta.get("val") if hasattr(node, "meta") else None
    if value is None or value.dim() == 0:
        return False
    rows = value.shape[0]
    return isinstance(rows, torch.SymInt) and any(str(s).startswith("u") for s in rows.node.expr.free_symbols)


def _ancestors(node, limit: int = 64) -> Iterable:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        todo.extend(n.all_input_nodes)


def unrouted_program_reads(program) -> list[str]:
    """The unrouted reads of expert stacks in a ``torch.export.ExportedProgram``, one line each;
    empty when every read is routed. Raises when the program has no expert stack (nothing to check)."""
    import torch

    aten = torch.ops.aten
    params = {n: p for n, p in program.graph_signature.inputs_to_parameters.items() if _is_expert_stack(p)}
    if not params:
        raise ValueError("the program has no expert weight stacks (w_gate/w_up/w_down)")
    matmuls = {aten.mm.default, aten.matmul.default, aten.bmm.default, aten.linear.default}
    problems = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in params:
            continue
        for user in node.users:
            where = f"{params[node.name]} -> {user.target}"
            if user.target == aten.select.int and user.args[1] == 0:
                for mm in user.users:
                    if mm.target not in matmuls:
                        problems.append(f"{where} -> {mm.target} (not a matmul over routed rows)")
                        continue
                    rows = next(a for a in mm.args if a is not user)
                    if not _data_dependent_rows(rows):
                        problems.append(f"{where} -> {mm.target} over every row")
            elif user.target in (aten.index.Tensor, aten.index_select.default):
                index = user.args[1][0] if user.target == aten.index.Tensor else user.args[2]
                if not any(a.target == aten.topk.default for a in _ancestors(index) if a.op == "call_function"):
                    problems.append(f"{where}: indices not from the router's top-k")
            else:
                problems.append(f"{where} (reads every expert)")
    return problems


def unrouted_onnx_reads(model) -> list[str]:
    """The unrouted reads of expert stacks in an ONNX ``ModelProto`` (initializers of rank 3 whose
    name ends in an expert stack's name, or that a routed MoE node takes as its expert weights)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stacks = {i.name for i in graph.initializer if len(i.dims) == 3 and _is_expert_stack(i.name)}
    for node in graph.node:  # weights only a routed op reads may be named after the op's inputs
        if (node.domain, node.op_type) in ROUTED_ONNX_OPS:
            stacks.update(n for n in node.input[2:] if n and n not in producers)
    if not stacks:
        raise ValueError("the graph has no expert weight stacks")

    def from_topk(name: str) -> bool:
        todo, seen = [name], set()
        while todo:
            n = todo.pop()
            if n in seen or n not in producers:
                continue
            seen.add(n)
            p = producers[n]
            if p.op_type == "TopK":
                return True
            todo.extend(p.input)
        return False

    problems = []
    for stack in sorted(stacks):
        for node in consumers.get(stack, []):
            if (node.domain, node.op_type) in ROUTED_ONNX_OPS:
                continue
            if node.op_type == "Gather" and node.input[0] == stack and from_topk(node.input[1]):
                continue
            problems.append(f"{stack} -> {node.op_type} {node.name} (reads every expert)")
    return problems
