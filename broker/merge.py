"""Merging the layers of an execution context, with provenance. Pure: no I/O.

Priority, lowest first: the template's ``env_spec`` defaults, then each
referenced environment in the order given, then the runtime layer. A later
layer's value replaces an earlier one. Secrecy only ever tightens: a key is
secret when the spec declares it secret or any layer that set it marked it
secret, so a higher layer cannot silently publish a value a lower one sealed.
A spec declaration without a value is required: if no layer sets it, the merge
fails listing every missing key at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from .protocol import KeyInfo, SpecEntry, Variable
from .protocol.errors import FailedPrecondition

__all__ = ["Merged", "merge"]

SPEC = "spec"
RUNTIME = "runtime"


@dataclasses.dataclass(frozen=True, slots=True)
class Merged:
    """The merged variables and, per key, where its value came from."""

    variables: dict[str, Variable] = dataclasses.field(repr=False)
    provenance: dict[str, str]

    def keys(self) -> list[KeyInfo]:
        return [KeyInfo(key=k, is_secret=self.variables[k].is_secret, source=self.provenance[k])
                for k in sorted(self.variables)]


def merge(spec: Mapping[str, SpecEntry], environments: Sequence[tuple[str, Mapping[str, Variable]]],
          runtime: Mapping[str, Variable]) -> Merged:
    """Return the merged context. Raises FailedPrecondition naming every missing required key."""
    values: dict[str, str] = {}
    secret: dict[str, bool] = {k: e.is_secret for k, e in spec.items()}
    provenance: dict[str, str] = {}

    def apply(layer: Mapping[str, Variable], source: str) -> None:
        for key, var in layer.items():
            values[key] = var.value
            secret[key] = secret.get(key, False) or var.is_secret
            provenance[key] = source

    for key, entry in spec.items():
        if entry.value is not None:
            values[key] = entry.value
            provenance[key] = SPEC
    for name, data in environments:
        apply(data, f"environment:{name}")
    apply(runtime, RUNTIME)

    missing = sorted(k for k in spec if k not in values)
    if missing:
        raise FailedPrecondition(
            f"required variable(s) without a value: {', '.join(missing)}; set them in an "
            "environment or pass them at runtime (--env / --secret)")
    variables = {k: Variable(value=values[k], is_secret=secret[k]) for k in sorted(values)}
    return Merged(variables=variables, provenance=provenance)
