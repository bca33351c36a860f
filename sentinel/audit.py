"""``sentinel audit MODULE:FACTORY``: check a model before launch, without training it.

The report is a list of sections, each with a status (``ok``, ``warn``, ``fail``): ``roles``
(every weight matrix's role, layer and fused parts, from :mod:`sentinel.roles`), then the
numeric checks of :mod:`sentinel.audit_checks` (Takase's two conditions and per-layer bound,
WeSaR's norm spread, Adam's ε against the gradient RMS).  A section function takes the :class:`AuditContext` (which holds
the model, the config and what earlier sections found, such as the role map) and returns a
:class:`Section`.

The model is built by calling ``FACTORY()`` inside ``with torch.device("meta")`` unless
``--no-meta`` is given: parameters then have names and shapes but no storage, so a 70B model
audits its roles in seconds on a laptop; the numeric checks need ``--no-meta`` (real weights and
one pass over ``--tokens`` random tokens) and say so otherwise.

Exit codes: 0 every section ok (or warn); 1 the factory raised; 2 usage or configuration error
(bad MODULE:FACTORY, bad config, unknown role in an override, an ambiguous ``auto`` preset, a bad
``--loss`` or ``--input-shape``); 3 a section failed (a weight matrix without a role, a block
without attention while the probes are on, or one of Takase's conditions broken); 4 the model
could not be run for the numeric checks (the message says what was tried; ``--input-shape`` and
``--loss MODULE:FUNCTION`` take over where the calling convention cannot be guessed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SECTIONS",
    "AuditContext",
    "AuditReport",
    "Section",
    "add_audit_parser",
    "audit_model",
    "build_model",
    "load_factory",
    "roles_section",
    "run_audit",
]

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_FAILED, EXIT_MODEL = 0, 1, 2, 3, 4
AUDIT_EPILOG = (
    "exit codes: 0 every check passed or only warned; 1 FACTORY() raised; "
    "2 usage or configuration error (bad MODULE:FACTORY, bad config or override, ambiguous 'auto' preset, "
    "bad --loss or --input-shape); "
    "3 a check failed (a weight matrix without a role, a block without attention while probes are on, or one of "
    "Takase's conditions broken; the fix is printed); "
    "4 the model could not be run for the numeric checks (pass --input-shape or --loss)"
)
STATUSES = ("skipped", "ok", "warn", "fail")  # report status: the worst


class AuditUsageError(Exception):
    """MODULE:FACTORY cannot be loaded or does not build a torch.nn.Module (exit 2)."""


class FactoryError(Exception):
    """FACTORY() raised (exit 1)."""


@dataclass
class Section:
    """One part of the report.  ``lines`` is the text body; ``data`` goes to ``--json``."""

    name: str
    status: str
    summary: str
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"section {self.name}: status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary, "data": self.data}


@dataclass
class AuditContext:
    """What section functions get: the model, the config, and what earlier sections found."""

    model: Any  # torch.nn.Module
    config: Any  # sentinel.Config
    preset: str | None = None  # --preset; None: config.roles.preset
    show_vectors: bool = False
    roles: Any = None  # sentinel.roles.RoleMap, set by roles_section
    tokens: int = 16  # random tokens of the numeric checks' one forward/backward pass
    adam_eps: float = 1e-8
    measured: Any = None  # per layer, the normalisation inputs' std (sentinel.audit_checks)
    skip: tuple[str, ...] = ()  # numeric checks not to run
    input_shape: tuple[int, int] | None = None  # --input-shape: batch, sequence of the numeric checks' pass
    loss_hook: Any = None  # --loss: loss_hook(model, ids) -> scalar loss


@dataclass
class AuditReport:
    target: str
    model: str
    device: str
    parameters: int
    elements: int
    sections: list[Section]

    @property
    def status(self) -> str:
        worst = max((s.status for s in self.sections), key=STATUSES.index, default="ok")
        return "ok" if worst == "skipped" else worst

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.status == "fail" else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model,
            "device": self.device,
            "parameters": self.parameters,
            "elements": self.elements,
            "status": self.status,
            "exit_code": self.exit_code,
            "sections": [s.to_dict() for s in self.sections],
        }

    def render(self) -> str:
        out = [
            f"sentinel audit {self.target}".rstrip(),
            f"model: {self.model} on {self.device}, {self.parameters} parameter tensors, "
            f"{self.elements / 1e6:,.2f} M elements",
        ]
        for section in self.sections:
            out += ["", f"== {section.name}: {section.status} - {section.summary}"]
            out += section.lines
        out += ["", f"result: {self.status}" + "".join(f"; {s.name} {s.status}" for s in self.sections)]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- sections


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def roles_section(ctx: AuditContext) -> Section:
    """Roles of every parameter: fails when a weight matrix (dim >= 2) has no role."""
    from sentinel.role_report import find_gaps, overrides_snippet
    from sentinel.roles import VECTOR_ROLES, assign_roles

    section = ctx.config.roles
    preset = ctx.preset or section.preset
    rm = assign_roles(ctx.model, preset=preset, overrides=section.overrides, structure=section.structure)
    ctx.roles = rm
    lines = []
    scores = ", ".join(f"{name} {n}" for name, n in sorted(rm.preset_scores.items(), key=lambda kv: -kv[1]))
    how = f"auto; matrices assigned per preset: {scores}" if rm.auto else "chosen"
    lines.append(f"preset: {rm.preset} ({how})")
    arch = [
        f"N={rm.n_layers if rm.n_layers is not None else '?'} layers",
        f"d={rm.d_model if rm.d_model is not None else '?'}",
        f"d_ffn={rm.d_ffn if rm.d_ffn is not None else '?'}",
    ]
    if rm.n_heads:
        arch.append(f"heads {rm.n_heads} (key/value {rm.n_kv_heads})")
    lines.append("architecture: " + ", ".join(arch))
    if section.overrides:
        lines.append("overrides: " + ", ".join(f"{k} -> {v}" for k, v in section.overrides.items()))

    rows = [("parameter", "role", "layer", "shape", "fused parts")]
    counts: dict[str, int] = {}
    for name, shape in rm.shapes.items():
        role = rm.get(name)
        is_matrix = len(shape) >= 2
        if role is not None and not is_matrix:
            counts[role.role] = counts.get(role.role, 0) + 1
        if not is_matrix and not ctx.show_vectors:
            continue
        label = name
        if role is not None and role.aliases:
            tied = ", ".join(f"{a} ({r or 'no role'})" for a, r in zip(role.aliases, role.alias_roles))
            label += f" = {tied}"
        rows.append(
            (
                label,
                role.role if role else "UNASSIGNED",
                "-" if role is None or role.layer is None else str(role.layer),
                "x".join(str(s) for s in shape) or "scalar",
                str(role.fused_parts) if role and role.fused_parts else "-",
            )
        )
    lines += ["", *(_table(rows) if len(rows) > 1 else ["(no parameters)"])]
    vectors = ", ".join(f"{counts.get(r, 0)} {r}" for r in VECTOR_ROLES)
    lines += ["", f"vectors: {vectors}, {len(rm.unassigned_vectors)} without a role (not required)"]
    if rm.unassigned_vectors:
        lines.append("  vectors without a role: " + ", ".join(rm.unassigned_vectors))
    fused = [n for n, r in rm.items() if r.fused_parts is not None]
    for name in fused[:1]:
        lines.append(f"fused split rule ({name}): {rm[name].fused_parts.rule}")
    if rm.unassigned:
        lines.append(f"unassigned matrices ({len(rm.unassigned)}):")
        lines += [f"  {n}  {'x'.join(str(s) for s in rm.shapes[n])}" for n in rm.unassigned]
        lines.append("  give them a role with roles.overrides (regex: role) in the config, or pick another --preset;")
        lines.append("  ready to paste into the sentinel config (check each role):")
        lines += ["    " + line for line in overrides_snippet(rm.unassigned).splitlines()]
    else:
        lines.append("unassigned matrices: none")
    lines += [f"note: {n}" for n in rm.notes]
    gaps = find_gaps(rm, ctx.config)
    lines += _structure_lines(rm)
    if gaps.blocks_without_attention:
        lines.append(f"blocks where no attention was found ({len(gaps.blocks_without_attention)}):")
        lines += [f"  {b}" for b in gaps.blocks_without_attention]
    if gaps.any and gaps.features_off:
        lines.append("off because of it: " + "; ".join(gaps.features_off))

    n_matrices = len(rm.matrices)
    data = rm.to_dict()
    data["blocks_without_attention"] = gaps.blocks_without_attention
    probes_on = ctx.config.probes.enabled
    if rm.unassigned:
        status, summary = "fail", f"{len(rm.unassigned)} of {n_matrices} weight matrices have no role"
    elif gaps.blocks_without_attention:
        status = "fail" if probes_on else "warn"
        summary = f"{len(gaps.blocks_without_attention)} blocks without a found attention" + (
            ": the configured attention-logit probe cannot run there" if probes_on else ""
        )
    else:
        status = "warn" if rm.notes else "ok"
        summary = f"all {n_matrices} weight matrices have a role (preset {rm.preset})"
    return Section("roles", status, summary, lines, data)


def _structure_lines(rm: Any) -> list[str]:
    st = rm.structure
    if st is None:
        return ["structure: not traced (the model has no forward); roles from the parameter names"]
    if st.error is not None:
        return [f"structure: not traced ({st.error}); roles from the parameter names"]
    kinds = sorted({a.kind for a in st.attentions})
    by_structure = sum(1 for n in rm.matrices if n in st.roles)
    shape = "x".join(map(str, st.tokens))
    return [
        f"structure: one traced forward on {shape} tokens: {len(st.attentions)} attention calls "
        f"({', '.join(kinds) or 'none'}), {by_structure} of {len(rm.matrices)} matrices placed by the dataflow"
    ]


#: the report's sections, in order; later checks append theirs
SECTIONS: list[Callable[[AuditContext], Section]] = [roles_section]


def _register_numeric_checks() -> None:
    from sentinel import audit_checks

    audit_checks.register(SECTIONS)


# ---------------------------------------------------------------- model loading


def load_factory(spec: str) -> Callable[[], Any]:
    """``MODULE:FACTORY`` -> the callable.  MODULE is a dotted module path or a .py file path."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise AuditUsageError(f"{spec!r} is not MODULE:FACTORY (e.g. examples/tiny_gpt.py:model or pkg.mod:build)")
    path = Path(module_part)
    if module_part.endswith(".py") or path.is_file():
        if not path.is_file():
            raise AuditUsageError(f"{module_part}: no such file")
        name = f"_sentinel_audit_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        if spec_ is None or spec_.loader is None:
            raise AuditUsageError(f"{module_part}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.resolve().parent))  # its sibling imports
        try:
            spec_.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise AuditUsageError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise AuditUsageError(f"importing {module_part} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AuditUsageError(f"{module_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AuditUsageError(f"{spec}: {attr} is not callable")
    return obj


def build_model(factory: Callable[[], Any], meta: bool = True) -> Any:
    """Call ``factory()`` (inside ``torch.device("meta")`` when ``meta``) and check it gave a Module."""
    import torch

    try:
        if meta:
            with torch.device("meta"):
                model = factory()
        else:
            model = factory()
    except Exception as exc:
        hint = " (if it needs real tensors, try --no-meta)" if meta else ""
        raise FactoryError(f"FACTORY() raised {type(exc).__name__}: {exc}{hint}") from exc
    if not isinstance(model, torch.nn.Module):
        raise AuditUsageError(f"FACTORY() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def audit_model(
    model: Any,
    config: Any = None,
    preset: str | None = None,
    target: str = "",
    show_vectors: bool = False,
    *,
    tokens: int = 16,
    adam_eps: float = 1e-8,
    skip: tuple[str, ...] = (),
    input_shape: tuple[int, int] | None = None,
    loss_hook: Any = None,
) -> AuditReport:
    """Run every section of :data:`SECTIONS` on ``model`` and return the report."""
    from sentinel.config import load_config

    config = load_config(config)
    ctx = AuditContext(
        model=model,
        config=config,
        preset=preset,
        show_vectors=show_vectors,
        tokens=tokens,
        adam_eps=adam_eps,
        skip=tuple(skip),
        input_shape=input_shape,
        loss_hook=loss_hook,
    )
    sections = [fn(ctx) for fn in SECTIONS]
    params = {id(p): p for p in model.parameters()}.values()
    devices = sorted({str(p.device) for p in params}) or ["no parameters"]
    return AuditReport(
        target=target,
        model=type(model).__name__,
        device=", ".join(devices),
        parameters=len(params),
        elements=sum(p.numel() for p in params),
        sections=sections,
    )


# ---------------------------------------------------------------- command line


def add_audit_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``sentinel`` command's subparsers."""
    from sentinel.roles import PRESET_CHOICES

    parser = sub.add_parser(
        "audit",
        help="check a model before launch: roles, Takase's stability conditions, WeSaR norm spread, Adam ε",
        description=(
            "Build the model by calling FACTORY() from MODULE (a dotted module path or a .py file) and "
            "report the role of every weight matrix (embedding, q, k, v, qkv, o, up, gate, gate_up, down, "
            "head...), its layer and fused parts, and the matrices no rule recognised. FACTORY() runs "
            'inside `with torch.device("meta")` (names and shapes only, no memory) unless --no-meta. '
            "With --no-meta it also checks Takase et al.'s two conditions (small sub-layers, large shortcut) "
            "and prints the per-layer gradient bound (eq. 15, 20), the spread of the matrices' norms (WeSaR) "
            "and the gradient RMS against Adam's eps, naming the fix of each failure. "
            "See docs/roles.md and docs/audit.md."
        ),
        epilog=AUDIT_EPILOG,
    )
    parser.add_argument("target", metavar="MODULE:FACTORY", help="e.g. examples/tiny_gpt.py:model or mypkg.model:build")
    parser.add_argument("--config", default=None, help="sentinel YAML config (its roles section is used)")
    parser.add_argument("--preset", choices=PRESET_CHOICES, default=None, help="override roles.preset")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all", action="store_true", help="list vectors (norms, biases) in the table too")
    parser.add_argument(
        "--no-meta",
        action="store_true",
        help="call FACTORY() on the default device instead of the meta device; needed by the numeric checks "
        "(Takase's conditions and bounds, WeSaR norm spread, Adam ε), which then run one forward/backward pass",
    )
    parser.add_argument("--tokens", type=int, default=16, help="random tokens for that pass (default 16)")
    parser.add_argument("--adam-eps", type=float, default=1e-8, help="the run's Adam ε (default 1e-8)")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("takase", "wesar", "eps"),
        help="a numeric check not to run (repeatable); skipping eps avoids the backward pass and its memory",
    )
    parser.add_argument(
        "--input-shape",
        type=_input_shape,
        default=None,
        metavar="B,T",
        help="batch and sequence length of the numeric checks' token ids (default 1,--tokens)",
    )
    parser.add_argument(
        "--loss",
        default=None,
        metavar="MODULE:FUNCTION",
        help="FUNCTION(model, ids) returning the scalar loss, for models whose calling convention the audit "
        "cannot guess (default: the model's own loss with targets=/labels=, else cross-entropy of its logits)",
    )
    parser.set_defaults(func=run_audit)
    return parser


def _input_shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not B,T (two positive integers, e.g. 2,64)") from None
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch and sequence length must be at least 1")
    return batch, seq


def run_audit(args: argparse.Namespace) -> int:
    from sentinel.config import load_config
    from sentinel.model_call import ModelCallError
    from sentinel_contract.typedconfig import ConfigError

    try:
        config = load_config(args.config)
        factory = load_factory(args.target)
        loss_hook = load_factory(args.loss) if getattr(args, "loss", None) else None
        model = build_model(factory, meta=not args.no_meta)
        report = audit_model(
            model,
            config,
            preset=args.preset,
            target=args.target,
            show_vectors=args.all,
            tokens=args.tokens,
            adam_eps=args.adam_eps,
            skip=tuple(args.skip),
            input_shape=getattr(args, "input_shape", None),
            loss_hook=loss_hook,
        )
    except (ConfigError, AuditUsageError) as exc:
        print(f"sentinel audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FactoryError as exc:
        print(f"sentinel audit: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ModelCallError as exc:
        print(
            f"sentinel audit: the numeric checks could not run the model: {exc}\n"
            "  fix: --input-shape B,T for the token ids it expects, or --loss MODULE:FUNCTION with "
            "FUNCTION(model, ids) returning the scalar loss; or --skip takase --skip wesar --skip eps",
            file=sys.stderr,
        )
        return EXIT_MODEL
    except Exception as exc:  # never a traceback: say what failed and where
        print(f"sentinel audit: {type(exc).__name__}: {exc} (an unexpected error; please report it)", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render(), end="")
    return report.exit_code


_register_numeric_checks()
