"""What the LM reads and writes: prompt templates, the answer prefix, token ids, JSONL records.

Stage 5a writes prompts with these templates; 5b trains on ``prompt +
ANSWER_PREFIX + " " + answer``; 5c scores candidate answers after ``prompt +
ANSWER_PREFIX``.  Keeping all of it here is what makes training and scoring
see the same token ids.

Templates (DIFT's, with GS-Quant's codes after each entity's name)::

    Here is a triple with the tail entity unknown: (dog <ent><a_1><b_7></ent>, hypernym, ?).
    About dog <ent>...</ent>: a domesticated carnivorous mammal ...
    Known facts about dog <ent>...</ent>: (dog <ent>...</ent>, has part, tail <ent>...</ent>); ...
    What is the tail entity? Choose one of these candidates: canine <ent>...</ent>; cat <ent>...</ent>; ...

ReaLM's short form keeps the first and last lines without the list (the
``compact`` template: ``(dog <ent>...</ent>, hypernym, ?)`` alone, and
``Candidates: ...`` as DIFT's last line); triple
classification asks "Is this triple true? (h, r, t)" with facts about h.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kgtok.data.graph import KnowledgeGraph
from kgtok.llm.config import InstructConfig
from kgtok.llm.vocab import ENTITY_BEGIN, ENTITY_END

ANSWER_PREFIX = "\nAnswer:"  # between prompt and answer; training and scoring both use it

Triple = tuple[int, int, int]

# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------


def readable_relation(name: str) -> str:
    """'/people/person/profession' -> 'people person profession'; '_hypernym' -> 'hypernym'."""
    return re.sub(r"[\s_/.]+", " ", name).strip()


def cut_words(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def entity_text(kg: KnowledgeGraph, entity: int, tokens: list[str] | None, config: InstructConfig) -> str:
    """An entity as prompts show it: its name, its codes between boundary tokens, or both (``ids_first``:
    codes, then name)."""
    parts = []
    if config.use_names:
        parts.append(kg.labels[entity])
    if config.use_codes and tokens is not None:
        parts.insert(0 if config.ids_first else len(parts), f"{ENTITY_BEGIN}{tokens[entity]}{ENTITY_END}")
    return " ".join(parts)


def triple_text(kg: KnowledgeGraph, triple: Triple, tokens: list[str] | None, config: InstructConfig) -> str:
    """``(head, relation, tail)`` with both entities as :func:`entity_text` shows them."""
    h, r, t = triple
    return (f"({entity_text(kg, h, tokens, config)}, {readable_relation(kg.relation_names[r])}, "
            f"{entity_text(kg, t, tokens, config)})")


def query_lines(relation_name: str, direction: int, known_text: str, template: str = "dift") -> tuple[str, str]:
    """The query triple with its unknown side marked, and the question (first and last lines of a prompt;
    ``compact``: the triple alone and no question)."""
    relation = readable_relation(relation_name)
    triple = f"({known_text}, {relation}, ?)" if direction == 0 else f"(?, {relation}, {known_text})"
    if template == "compact":
        return triple, ""
    side = "tail" if direction == 0 else "head"
    return f"Here is a triple with the {side} entity unknown: {triple}.", f"What is the {side} entity?"


def dift_prompt_parts(kg: KnowledgeGraph, triple: Triple, direction: int, candidates: list[int],
                      neighbours: list[Triple], tokens: list[str] | None, config: InstructConfig) -> dict[str, Any]:
    """The DIFT instruction (GS-Quant adds codes) in parts (:func:`compose_prompt`): query, the known entity's
    description, its triples, the question with the candidate list."""
    h, r, t = triple
    known = h if direction == 0 else t
    known_text = entity_text(kg, known, tokens, config)
    query, question = query_lines(kg.relation_names[r], direction, known_text, config.template)
    listed = "; ".join(entity_text(kg, c, tokens, config) for c in candidates)
    ask = f"{question} Choose one of these candidates: {listed}." if question else f"Candidates: {listed}."
    has_description = config.use_descriptions and bool(kg.descriptions[known])
    return {
        "head": [query],
        "about": f"About {known_text}: ",
        "description": cut_words(kg.descriptions[known], config.description_words) if has_description else "",
        "facts_about": f"Known facts about {known_text}: ",
        "facts": [triple_text(kg, f, tokens, config) for f in neighbours] if config.use_neighbours else [],
        "tail": [ask],
    }


def classification_prompt_parts(kg: KnowledgeGraph, triple: Triple, facts: list[Triple],
                                tokens: list[str] | None, config: InstructConfig) -> dict[str, Any]:
    """Triple classification (ReaLM) in parts: the triple, facts about its head, the two answers."""
    return {"head": [f"Is this triple true? {triple_text(kg, triple, tokens, config)}"],
            "about": "", "description": "", "facts_about": "Known facts: ",
            "facts": [triple_text(kg, f, tokens, config) for f in facts] if config.use_neighbours else [],
            "tail": ["Answer true or false."]}


def classification_prompt(kg: KnowledgeGraph, triple: Triple, facts: list[Triple], tokens: list[str] | None,
                          config: InstructConfig) -> str:
    return compose_prompt(classification_prompt_parts(kg, triple, facts, tokens, config))


# ----------------------------------------------------------------------------
# The prompt budget: trim context, never the query, the question or a candidate
# ----------------------------------------------------------------------------


def compose_prompt(parts: dict[str, Any], facts: int | None = None, description_words: int | None = None) -> str:
    """A prompt from its parts, with at most ``facts`` neighbour facts and ``description_words`` words of the
    description (None: all; 0 words drops the description line)."""
    lines = list(parts["head"])
    description = parts["description"]
    if description_words is not None and description:
        description = cut_words(description, description_words) if description_words else ""
    if description:
        lines.append(parts["about"] + description)
    listed = parts["facts"][:facts] if facts is not None else parts["facts"]
    if listed:
        lines.append(parts["facts_about"] + "; ".join(listed) + ".")
    return "\n".join(lines + list(parts["tail"]))


def _largest(fits: Any, high: int) -> int:
    """The largest n in [0, high] with fits(n), given fits is monotone (-1 when even 0 does not fit)."""
    low, best = 0, -1
    while low <= high:
        middle = (low + high) // 2
        if fits(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def fit_prompt(tokenizer: Any, record: dict[str, Any], room: int) -> tuple[list[int], str]:
    """Token ids of a record's prompt in at most ``room`` ids, and what that took: ``fit`` | ``trimmed`` | ``over``.

    An over-long prompt loses neighbour facts first (from the last), then words of the description (from the
    end), never the query line, the question or a candidate: when those alone exceed ``room`` they are kept
    whole (``over``; the sequence is then longer than the budget).  Records without ``prompt_parts`` (written
    before the budget existed) lose their beginning as before.
    """
    return fit_encoded_prompt(tokenizer, record, encode_prompt(tokenizer, record["prompt"]), room)


def fit_encoded_prompt(tokenizer: Any, record: dict[str, Any], ids: list[int], room: int) -> tuple[list[int], str]:
    """:func:`fit_prompt` given the ids of the record's whole prompt (tokenised in a batch beforehand)."""
    if len(ids) <= room:
        return ids, "fit"
    parts = record.get("prompt_parts")
    if parts is None:
        return truncate_prompt(tokenizer, ids, room), "trimmed"

    def encoded(facts: int, words: int | None) -> list[int]:
        return encode_prompt(tokenizer, compose_prompt(parts, facts, words))

    facts = _largest(lambda n: len(encoded(n, None)) <= room, len(parts["facts"]))
    if facts >= 0:
        return encoded(facts, None), "trimmed"
    words = _largest(lambda n: len(encoded(0, n)) <= room, len(parts["description"].split()))
    if words >= 0:
        return encoded(0, words), "trimmed"
    return encoded(0, 0), "over"


def training_text(record: dict[str, Any]) -> str:
    """A record as the LM is trained on it: prompt, answer prefix, answer."""
    return record["prompt"] + ANSWER_PREFIX + " " + record["answer"]


# ----------------------------------------------------------------------------
# Token ids (training and scoring alike)
# ----------------------------------------------------------------------------


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt up to the answer (BOS first when the tokenizer has one)."""
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """:func:`encode_prompt` of each prompt, in one call of the tokenizer (a fast one encodes the batch in
    Rust, over threads, instead of a Python call per prompt)."""
    if not prompts:
        return []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer([p + ANSWER_PREFIX for p in prompts], add_special_tokens=False)["input_ids"]]


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an answer, EOS last: prompt and answer are tokenised apart so that a
    candidate's ids are the same whatever prompt precedes it."""
    return encode_answers(tokenizer, [answer])[0]


def encode_answers(tokenizer: Any, answers: list[str]) -> list[list[int]]:
    """:func:`encode_answer` of each answer, in one call of the tokenizer."""
    if not answers:
        return []
    eos = [tokenizer.eos_token_id]
    return [ids + eos for ids in tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]]


def truncate_prompt(tokenizer: Any, prompt_ids: list[int], room: int) -> list[int]:
    """At most ``room`` ids: an over-long prompt loses its beginning, after BOS (records without parts only:
    :func:`fit_prompt` keeps the query)."""
    if len(prompt_ids) <= room:
        return prompt_ids
    head = 1 if tokenizer.bos_token_id is not None else 0
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (room - head):]


def pad_left(sequences: list[list[int]], value: int) -> tuple[Any, Any]:
    """(rows, width) int64 ids left-padded with ``value``, and the (rows, width) mask of real tokens."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):  # a batch of rows
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


# ----------------------------------------------------------------------------
# JSONL records
# ----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One record per non-empty line; a bad line is reported with its file and line number."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from error
    return records


def jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(jsonl_line(record))
