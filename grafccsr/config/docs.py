"""The schema described for people: every key with its type, default and docstring.

Used by ``python -m grafccsr.train --help`` (a Hydra help template generated from the schema)
and available to documentation tools. Field docstrings are the string literals that follow
each field in the dataclass source, read with :mod:`ast`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from typing import Dict, Iterator, List, Tuple

from grafccsr.config.schema import Config
from grafccsr.paths import program_name


def field_docs(cls: type) -> Dict[str, str]:
    """``{field name: docstring}`` of a dataclass (fields without one are left out)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.replace("``", "").split())
    return docs


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def keys(cls: type = Config, prefix: str = "") -> Iterator[Tuple[str, str, object, str]]:
    """(dotted key, type, default, docstring) of every leaf of the schema."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _type_name(tp), getattr(defaults, f.name), docs.get(f.name, "")


def first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head if len(head) <= 110 else head[:107] + "..."


def reference(width: int = 46) -> List[str]:
    """One line per key: ``key: type = default   what it is``."""
    lines, section = [], None
    for key, tp, default, doc in keys():
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            lines.append("")
            lines.append(f"{top or 'top level'}:")
        shown = f"  {key}: {tp} = {default!r}"
        lines.append(f"{shown:<{width}} {first_sentence(doc)}" if doc else shown)
    return lines


HELP_HEADER = """python -m grafccsr.train [+exp=PRESET] [GROUP=OPTION ...] [KEY=VALUE ...]

Train a GRAF+CCSR 3D-aware GAN. The config is conf/ composed onto a typed schema whose defaults
are the default CPU job; every key below can be overridden (a misspelt key, a wrong type or an
impossible combination stops the run with the key named, exit 2). resume=RUN_FOLDER continues
a run from its own stored config. Exit codes: 0 finished, 2 bad config, 3 out of memory,
4 NaN/Inf loss, 5 unreadable data, 130 interrupted (checkpoint written), 1 a bug.

Presets (+exp=NAME): smoke (seconds), fast (the default job with a third of the points per ray),
amp_bs8 (GPU research config), baseline_fp32, seed_all, graf_ccsr_original (the reference for
every ratio); conf/exp/NAME.yaml says what each sets."""

HELP_FOOTER = """Print the composed, validated config: python -m grafccsr.train --cfg job [overrides]
Hydra's own options (multirun, sweeps, logging): python -m grafccsr.train --hydra-help"""


@functools.lru_cache(maxsize=None)
def help_template() -> Dict[str, str]:
    """Hydra's ``hydra/help`` node: header, the groups and their options, the key reference.
    Built once per process: every compose registers it, and it parses the schema's source."""
    body = "\n".join(reference())
    template = ("${hydra.help.header}\n\n== Config groups (GROUP=OPTION) ==\n$APP_CONFIG_GROUPS\n"
                "== Keys (KEY=VALUE): type = default, what it is ==" + body.replace("$", "$$") +
                "\n\n== Flags ==\n$FLAGS_HELP\n${hydra.help.footer}")
    prog = program_name("python -m grafccsr.train")
    return {"app_name": "grafccsr.train", "header": HELP_HEADER.replace("python -m grafccsr.train", prog),
            "footer": HELP_FOOTER.replace("python -m grafccsr.train", prog), "template": template}
