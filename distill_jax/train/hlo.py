r"""Reading a compiled program's optimized HLO text: collectives, loop trip counts, big buffers.

``compiled.as_text()`` of an SPMD-partitioned program is the per-chip program, so every shape in it
is a per-chip shape. What this module reads from it (``train/aot.py`` reports it):

* ``collectives(text)``: bytes per chip of all-gather, reduce-scatter, all-reduce, all-to-all and
  collective-permute, each op counted as many times as it runs: an op inside a while loop's body
  (at any depth of calls, fusions and async wrappers) is multiplied by the loop's trip count.
  The trip count is ``known_trip_count`` from the loop's backend_config when XLA states it, else
  N when the loop's condition is ``counter < constant(N)`` (how ``lax.scan``/``fori_loop`` and
  XLA's windowed einsums count from 0), else 1, and the loop is listed as unknown.
* ``largest_buffers(text)``: the biggest values the program computes (temporaries), with the JAX
  operation that made each, for a message that says what did not fit.

TPU's asynchronous collective fusions repeat one collective (the same ``channel_id``) in its
start fusion, in continuation fusions that overlap it with compute (often inside a windowed
einsum loop) and in its done fusion: such copies are counted once, at the executions of the
least repeated copy (the start's).

Bytes of one collective: the larger of its operands and its result, i.e. the full buffer each
chip ends with (all-gather) or starts from (reduce-scatter); for the asynchronous ``*-start`` /
``*-done`` pairs, the operands of the start and the result of the done. Link traffic per chip
(``Collective.traffic``): (n - 1) / n of that for all-gather, reduce-scatter and all-to-all over
groups of n chips, twice that for all-reduce (a reduce-scatter then an all-gather), and the whole
buffer for collective-permute.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2}
BYTES.update({"bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
BYTES.update({"c128": 16, "token": 0})

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result shape as printed, e.g. "bf16[4,8]{1,0}" or a tuple "(f32[], s32[8])"
    opcode: str
    operands: tuple[str, ...]  # names of the operand instructions
    arguments: str  # the operand list as printed (a constant's value, e.g. "8")
    attributes: str  # everything after the operand list


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    name: str
    bytes: float  # per chip, one execution
    group_size: int  # chips that take part together (n)
    count: int  # executions per step (product of enclosing loops' trip counts)
    op_name: str  # the JAX operation (HLO metadata), "" if absent

    @property
    def traffic(self) -> float:
        """Bytes over ICI links per chip for all ``count`` executions (see module docstring)."""
        n = max(self.group_size, 1)
        share = 1.0 if self.kind == "collective-permute" else (n - 1) / n
        return self.bytes * share * (2 if self.kind == "all-reduce" else 1) * self.count


def shape_bytes(shape: str) -> float:
    """Bytes of a printed shape (tuples summed; layouts such as {1,0:T(8,128)} ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(_strip_layouts(shape)):
        if dtype in BYTES:
            sizes = [int(d.lstrip("<=")) for d in dims.split(",") if d]
            total += BYTES[dtype] * math.prod(sizes)
    return total


def _strip_layouts(shape: str) -> str:
    out, depth = [], 0
    for ch in shape:
        depth += ch == "{"
        if not depth:
            out.append(ch)
        depth -= ch == "}" and depth > 0
    return "".join(out)


def _split_instruction(rhs: str) -> tuple[str, str, str, str] | None:
    """ "SHAPE opcode(operands), attributes" -> (shape, opcode, operands, attributes)."""
    i, depth = 0, 0
    while i < len(rhs):  # the shape: a balanced tuple, or a token with a {layout}
        ch = rhs[i]
        depth += ch in "({["
        depth -= ch in ")}]"
        i += 1
        if depth == 0 and (ch in ")}" or rhs[i : i + 1] == " "):  # "f32[2]{0}", "(...)", "s32[]"
            break
    shape, rest = rhs[:i].strip(), rhs[i:].lstrip()
    m = re.match(r"([\w\-.]+)\(", rest)
    if not m:
        return None
    j, depth = m.end(), 1
    while j < len(rest) and depth:
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        j += 1
    return shape, m.group(1), rest[m.end() : j - 1], rest[j:]


def _operand_names(operands: str) -> tuple[str, ...]:
    """Names in an operand list: ``%a, %b`` or, in short form, ``f32[2]{0} a, b``."""
    if "%" in operands:
        return tuple(re.findall(r"%([\w.\-]+)", operands))
    pieces, depth, current = [], 0, []
    for ch in operands:
        depth += ch in "({["
        depth -= ch in ")}]"
        if ch == "," and depth == 0:
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    words = [p.split()[-1] for p in pieces if p.split()]
    return tuple(w for w in words if re.fullmatch(r"[A-Za-z_][\w.\-]*", w))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: instructions}, entry computation name) of HLO module text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line) if current is not None else None
        parts = _split_instruction(m.group(3)) if m else None
        if parts:
            shape, opcode, operands, attributes = parts
            names = _operand_names(operands)
            computations[current].append(
                Instruction(m.group(2), shape, opcode, names, operands, attributes)
            )
    return computations, entry or (list(computations)[-1] if computations else "")


def _callees(inst: Instruction) -> list[tuple[str, str]]:
    """(relation, computation) pairs an instruction calls."""
    out = [(rel, name) for rel, name in _CALLEE.findall(inst.attributes)]
    for rel, names in _CALLEE_LIST.findall(inst.attributes):
        out += [(rel, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def trip_count(inst: Instruction, computations: dict[str, list[Instruction]]) -> int | None:
    """Iterations of a while loop: known_trip_count, else N of a ``counter < constant(N)``
    condition, else None."""
    m = _TRIP.search(inst.attributes)
    if m:
        return int(m.group(1))
    condition = dict((rel, name) for rel, name in _callees(inst)).get("condition")
    body = computations.get(condition or "", [])
    if not body:
        return None
    by_name = {i.name: i for i in body}
    root = body[-1]
    if root.opcode != "compare" or "direction=LT" not in root.attributes:
        return None
    bound = by_name.get(root.operands[1]) if len(root.operands) == 2 else None
    if bound is None or bound.opcode != "constant":
        return None
    value = re.fullmatch(r"\s*(-?\d+)\s*", bound.arguments)
    return int(value.group(1)) if value else None


def multiplicities(
    computations: dict[str, list[Instruction]], entry: str
) -> tuple[dict[str, int], list[str]]:
    """({computation: executions per run of the entry}, while loops of unknown trip count)."""
    order, seen = [], set()

    def visit(name):  # post-order over the call graph
        if name in seen or name not in computations:
            return
        seen.add(name)
        for inst in computations[name]:
            for _, callee in _callees(inst):
                visit(callee)
        order.append(name)

    visit(entry)
    count: dict[str, int] = defaultdict(int)
    count[entry] = 1
    unknown = []
    for name in reversed(order):  # callers before callees
        for inst in computations[name]:
            trips = 1
            if inst.opcode == "while":
                n = trip_count(inst, computations)
                if n is None:
                    unknown.append(inst.name)
                trips = n if n is not None else 1
            for rel, callee in _callees(inst):
                count[callee] += count[name] * (trips if rel in ("body", "condition") else 1)
    return dict(count), unknown


def group_size(attributes: str, num_devices: int) -> int:
    """Chips per replica group: ``mesh['a'=16,'b'=2] {'a'}`` (16), ``{{0,1},{2,3}}`` (2), the iota
    form ``[4,2]<=[8]`` (2); no groups (or ``{}``) means all ``num_devices``."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if m:
        sizes = {k.strip("' "): int(v) for k, v in re.findall(r"('[^']+'|\w+)=(\d+)", m.group(1))}
        return math.prod(sizes.get(a.strip("' "), 1) for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_devices


def _op_name(attributes: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attributes)
    return m.group(1) if m else ""


def collectives(text: str, num_devices: int = 1) -> tuple[list[Collective], list[str]]:
    """Every collective of an optimized HLO module with its per-chip bytes and executions per
    step, and the names of while loops whose trip count could not be read (counted once).

    Args:
        text: ``compiled.as_text()``.
        num_devices: chips of the program (the group of a collective without replica groups).
    """
    computations, entry = parse_module(text)
    counts, unknown = multiplicities(computations, entry)
    shapes = {i.name: i.shape for insts in computations.values() for i in insts}
    done = {
        i.operands[0]: i
        for insts in computations.values()
        for i in insts
        if i.opcode.endswith("-done") and i.operands
    }
    # TPU's asynchronous collectives are fusions (start, continuation, done) whose bodies repeat
    # one collective with its channel_id: those copies count once. Collectives outside fusion
    # bodies are separate operations even when they share a channel_id (shard_map's do).
    fused = {
        callee
        for insts in computations.values()
        for i in insts
        if i.opcode == "fusion"
        for rel, callee in _callees(i)
        if rel == "calls"
    }
    out: dict[tuple[str, str], Collective] = {}
    for name, insts in computations.items():
        if not counts.get(name):
            continue
        for inst in insts:
            kind = inst.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            channel = re.search(r"\bchannel_id=(\d+)", inst.attributes)
            key = (kind, channel.group(1) if channel and name in fused else inst.name)
            if key in out and out[key].count <= counts[name]:
                continue  # a copy of an asynchronous collective (see the module docstring)
            result = inst.shape
            if inst.opcode.endswith("-start"):
                result = done[inst.name].shape if inst.name in done else ""
            operand = sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
            size = max(shape_bytes(result), operand)
            n = group_size(inst.attributes, num_devices)
            op_name = _op_name(inst.attributes)
            out[key] = Collective(kind, inst.name, size, n, counts[name], op_name)
    return list(out.values()), unknown


def bytes_by_kind(ops: list[Collective]) -> dict[str, dict[str, float]]:
    """{kind: {"bytes": per chip per step, "traffic": link bytes per chip per step, "ops": n}}."""
    out = {k: {"bytes": 0.0, "traffic": 0.0, "ops": 0} for k in KINDS}
    for op in ops:
        out[op.kind]["bytes"] += op.bytes * op.count
        out[op.kind]["traffic"] += op.traffic
        out[op.kind]["ops"] += op.count
    return out


# Control flow: the computations these call run their own top-level instructions.
_CONTROL = {"while", "conditional", "call"}
# No memory traffic of their own (aliases, control, constants folded into their users).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}
_NO_TRAFFIC |= {"partition-id", "replica-id", "opt-barrier"} | _CONTROL


def _parameter_index(inst: Instruction) -> int | None:
    m = re.fullmatch(r"\s*(\d+)\s*", inst.arguments) if inst.opcode == "parameter" else None
    return int(m.group(1)) if m else None


def _fusion_traffic(inst: Instruction, body: list[Instruction], shapes: dict[str, str]) -> float:
    """Bytes a fusion reads and writes: each operand whole, except one the fused body only
    dynamic-slices (the slices are read) or updates in place (a dynamic-update-slice root: the
    update is written, the rest of the buffer is neither read nor written)."""
    users: dict[str, list[Instruction]] = defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)
    params = {_parameter_index(i): i.name for i in body if i.opcode == "parameter"}
    root = body[-1] if body else None
    in_place = None
    out = shape_bytes(inst.shape)
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        in_place = root.operands[0]
        out = shape_bytes(shapes.get(root.operands[1], ""))
    total = out
    for k, operand in enumerate(inst.operands):
        name = params.get(k)
        uses = users.get(name, [])
        if name is not None and name == in_place:
            continue
        if uses and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in uses):
            total += sum(shape_bytes(u.shape) for u in uses)
        else:
            total += shape_bytes(shapes.get(operand, ""))
    return total


def hbm_bytes(text: str) -> tuple[float, list[str]]:
    """Bytes one step moves through HBM, per chip: the operands and result of every top-level
    instruction (a fusion, dot, copy, collective, custom call: what reads and writes memory;
    what happens inside a fusion stays on chip), each times its executions per step (loop
    bodies x trip count). A slice of a larger buffer (a scanned layer's parameters, a
    dynamic-update-slice into a stacked output) counts the slice. XLA's own
    ``cost_analysis()["bytes accessed"]`` counts alike but each loop body once.

    Returns:
        (bytes, while loops of unknown trip count, counted once).
    """
    computations, entry = parse_module(text)
    counts, unknown = multiplicities(computations, entry)
    control = {entry}
    for insts in computations.values():
        for inst in insts:
            if inst.opcode in _CONTROL:
                control.update(c for _, c in _callees(inst))
    shapes = {i.name: i.shape for insts in computations.values() for i in insts}
    total = 0.0
    for name in control:
        for inst in computations.get(name, []):
            if inst.opcode in _NO_TRAFFIC or inst.opcode.endswith("-done"):
                continue
            if inst.opcode == "fusion":
                fused = dict(_callees(inst)).get("calls", "")
                moved = _fusion_traffic(inst, computations.get(fused, []), shapes)
            elif inst.opcode == "dynamic-slice":
                moved = 2 * shape_bytes(inst.shape)
            elif inst.opcode == "dynamic-update-slice" and len(inst.operands) > 1:
                moved = 2 * shape_bytes(shapes.get(inst.operands[1], ""))
            else:
                operands = sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
                moved = shape_bytes(inst.shape) + operands
            total += moved * counts.get(name, 0)
    return total, unknown


_NOT_BUFFERS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while"}
_NOT_BUFFERS |= {"copy-start", "copy-done", "conditional", "call", "opt-barrier"}


def largest_buffers(text: str, n: int = 3) -> list[tuple[float, str, str]]:
    """The ``n`` largest values the program computes: (bytes per chip, shape, JAX op name), one
    per distinct (shape, op name); parameters, tuples and aliases are not new buffers."""
    computations, _ = parse_module(text)
    best: dict[tuple[str, str], float] = {}
    for insts in computations.values():
        for inst in insts:
            if inst.opcode in _NOT_BUFFERS or inst.shape.startswith("("):
                continue
            key = (_strip_layouts(inst.shape), _op_name(inst.attributes))
            best[key] = max(best.get(key, 0.0), shape_bytes(inst.shape))
    ranked = sorted(((b, s, o) for (s, o), b in best.items()), reverse=True)
    return ranked[:n]
