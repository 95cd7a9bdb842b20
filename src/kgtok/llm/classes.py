"""Entity classes: for ReaLM's class prediction (5a's ``class_prefix``) and the class constraint (5c).

Classes come from a file of entity<TAB>class lines, or a stage-3 artifact's
level-1 clusters.  With ``class_prefix`` an answer starts with its class token
``<cls_N>`` (``<cls_none>`` when the class is unknown): the LM learns to
generate the target's class before the entity, and 5c reads the class it
predicts off the candidates' class-token log-probs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UNKNOWN_CLASS = "<cls_none>"


def class_token(entity_class: int) -> str:
    """The token of a class id (-1: unknown)."""
    return f"<cls_{entity_class}>" if entity_class >= 0 else UNKNOWN_CLASS


def load_classes(source: str | Path | np.ndarray | None, entity_names: list[str]) -> np.ndarray | None:
    """(N,) class id per entity from an array, a file of entity<TAB>class, or a stage-3 artifact."""
    if source is None or isinstance(source, np.ndarray):
        return source
    path = Path(source)
    if path.is_dir():
        from kgtok.hierarchy.stage import load_hierarchy

        hierarchy = load_hierarchy(path, entity_names or None)  # its rows must be in the KG's order
        return np.asarray(hierarchy["paths"])[:, 0]
    index = {name: i for i, name in enumerate(entity_names)}
    classes = np.full(len(entity_names), -1, dtype=np.int64)
    names: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected entity<TAB>class, got {len(fields)} field(s)")
        if fields[0] not in index:
            raise ValueError(f"{path}:{number}: unknown entity {fields[0]!r}")
        classes[index[fields[0]]] = names.setdefault(fields[1], len(names))
    return classes
