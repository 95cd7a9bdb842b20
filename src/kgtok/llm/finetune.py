"""Stage 5b: teach a causal LM to read and write entity codes (HF Trainer; LoRA or full training).

Recipe: resolve the backbone (a local HF directory, or a built-in: ``tiny``
is built here from the instructions' text); add the code and boundary tokens
(:mod:`kgtok.llm.vocab`); train on LM-train with the loss on the answer tokens
only, validating on LM-valid each epoch; merge LoRA into the weights and save
a plain Hugging Face directory that ``kgtok evaluate`` (or any HF tool) opens.

Trainable parts: a pretrained backbone gets LoRA adapters plus its new token
rows (PEFT ``trainable_token_indices``; the reference: r 64, α 32, dropout
0.1, q_proj/v_proj, lr 2e-4).  A from-scratch backbone (``tiny``) has nothing
worth freezing, so every weight trains (``adapter: auto``).

Scaling: the same command runs under ``accelerate launch`` (several CPU
processes with gloo, several GPUs, DeepSpeed/FSDP through an accelerate
config); the Trainer takes its device from there.  Precision (``precision:
auto``): bf16 on GPUs that support it, else fp16; on the CPU bf16 autocast
only where a training step of this model measures faster in it (SmolLM2 on an
AMX Xeon: 1.58x; the tiny LM there, and every model on CPUs without native
bf16, are faster in fp32), else fp32.  Checkpoints go to ``<dest>.work/``; a
killed run resumes from the newest one.

Artifact (``dest``): ``model/`` (HF model + tokenizer), ``manifest.json``,
``metrics.json`` (losses per logging step and epoch, tokens/s).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kgtok.artifacts import read_json, read_manifest, warn_if_made_from_another, write_json_atomic
from kgtok.llm.backbone import backbone_fingerprint, is_from_scratch, resolve_backbone
from kgtok.llm.config import FinetuneConfig  # here too: kgtok.llm.finetune.FinetuneConfig is public
from kgtok.llm.layout import FinetuneArtifact, InstructArtifact
from kgtok.llm.prompts import encode_answers, encode_prompts, fit_encoded_prompt, pad_left, read_jsonl, training_text
from kgtok.llm.vocab import BOUNDARY_TOKENS, code_levels, code_vocabulary, extend_vocabulary
from kgtok.quantize.layout import QuantizeArtifact
from kgtok.stage import Context, Input, Stage, run_stage

IGNORE_INDEX = -100  # label of the prompt tokens: no loss there


def encode_example(tokenizer: Any, record: dict[str, Any], max_length: int) -> dict[str, Any]:
    """input_ids and labels (prompt masked) of a record; an over-long prompt is trimmed by
    :func:`kgtok.llm.prompts.fit_prompt` (``budget``: fit, trimmed or over)."""
    return encode_examples(tokenizer, [record], max_length)[0]


def encode_examples(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """:func:`encode_example` of each record, the prompts and answers tokenised in one call each."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in records])
    answers = encode_answers(tokenizer, [r["answer"] for r in records])
    out = []
    for record, whole, answer_ids in zip(records, prompts, answers):
        prompt_ids, budget = fit_encoded_prompt(tokenizer, record, whole, max_length - len(answer_ids))
        out.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                    "budget": budget})
    return out


def loss_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LM-valid records the validation loss is taken on: those whose gold is in their list (alignment and
    classification records have no list and all count).

    LM-train keeps no other (``instruct.confident``), and on a query whose gold is missing from its list an LM
    that has learnt to choose from the list is rightly unsure of it, so those records' loss rises as the LM
    learns (on the WN18RR 6k subset 60% of the 40 LM-valid queries): mixed in, they hid whether the loss of
    the queries the LM is trained for, code tokens included, still falls (issue 15 item 3).
    """
    return [r for r in records if r.get("gold_in_candidates", True)]


def budget_counts(examples: list[dict[str, Any]]) -> dict[str, int]:
    """How many encoded examples the prompt budget trimmed, and how many stayed over it (query and list alone)."""
    return {key: sum(e["budget"] == key for e in examples) for key in ("trimmed", "over")}


def class_tokens(texts: list[str]) -> list[str]:
    """The class tokens (``<cls_N>``, ``<cls_none>``) the training texts use, sorted."""
    import re

    return sorted({token for text in texts for token in re.findall(r"<cls_[^<>\s]+>", text)})


def class_vocabulary(instructions: InstructArtifact) -> list[str]:
    """The class tokens of every split's answers and candidate answers (``class_prefix``): a class that no
    LM-train or LM-valid answer has is still one token when test's candidates name it (its pieces broke the
    class read from the scores).  Vocabulary only: no test label is read."""
    found = []
    for split in ("lm_train", "lm_valid", "test"):
        path = instructions.split(split)
        if path.exists():
            found += class_tokens([" ".join([r.get("answer", ""), *r.get("candidate_answers", [])])
                                   for r in read_jsonl(path)])
    return sorted(set(found))


def load_backbone(config: FinetuneConfig, texts: list[str], work: Path, codes: str | Path | None,
                  entities: list[dict[str, Any]] | None = None, classes: list[str] | None = None
                  ) -> tuple[Any, Any, list[int], Path]:
    """Model and tokenizer with the code vocabulary added; returns (model, tokenizer, new token ids, path).

    ``entities``: the instructions' ``entities.jsonl`` rows, for ``embedding_init: names``; ``classes``: the
    class tokens to add (None: those in ``texts``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_backbone(config.backbone, texts, work, config.tiny, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens, codebooks = (code_vocabulary(codes) if codes is not None else ([], None))
    # class_prefix answers: one token per class (rows from the mean)
    tokens = tokens + (class_tokens(texts) if classes is None else list(classes))
    new_ids = extend_vocabulary(model, tokenizer, list(BOUNDARY_TOKENS) + tokens, init=config.embedding_init,
                                codebooks=codebooks, entities=entities, seed=config.seed)
    return model, tokenizer, new_ids, path


def read_entities(instructions: InstructArtifact) -> list[dict[str, Any]]:
    """The instructions' ``entities.jsonl`` (names and ids per entity), with a hint when it is missing."""
    path = instructions.entities
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: embedding_init=names needs the entities' names and ids, "
                                "which instruct writes with ids=codes or random (run instruct again)")
    return read_jsonl(path)


def wrap_trainable(model: Any, config: FinetuneConfig, full: bool, new_ids: list[int]) -> Any:
    """Full training, or LoRA adapters plus the new token rows (input rows, and output rows when untied)."""
    if full:
        return model
    from peft import LoraConfig, get_peft_model

    from kgtok.quantize.hf import embedding_matrices

    rows = None
    if new_ids:
        rows = {"embed_tokens": list(new_ids)}
        if len(embedding_matrices(model)) > 1:  # an untied output layer: the new tokens' rows there are new too
            head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
            rows[head.rsplit(".", 1)[-1]] = list(new_ids)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM", trainable_token_indices=rows)
    return get_peft_model(model, lora)


class PaddingCollator:
    """Left-pads a batch so every answer ends at the last position.

    Then the LM head runs only on the last ``logits_to_keep`` positions, those
    that predict answer tokens: the loss needs nothing else, and the head over
    the vocabulary is a large share of a small model's compute.  Positions
    count from each row's first real token (as in evaluation).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids, mask = pad_left([f["input_ids"] for f in features], self.pad_id)
        labels, _ = pad_left([f["labels"] for f in features], IGNORE_INDEX)
        width = ids.shape[1]
        answer = int((labels != IGNORE_INDEX).sum(1).max())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
                "logits_to_keep": torch.arange(width - answer - 1, width)}  # (answer + 1,) positions


class NewTokenRate:
    """The new token rows learn at ``multiplier`` x the learning rate (``new_token_lr_multiplier``).

    LoRA: PEFT keeps the new rows in their own tensors (``trainable_tokens_delta``), which get their own
    optimiser group.  Full training: the rows share the embedding matrix with the old ones, so no group can
    hold them; after each optimiser step their update is scaled by ``multiplier`` (AdamW's step, decay
    included, is linear in the learning rate, so this is the same as a learning rate of their own; the
    schedule applies to both).  Output rows of an untied head are scaled alike.
    """

    def __init__(self, model: Any, new_ids: list[int], multiplier: float) -> None:
        self.model, self.new_ids, self.multiplier = model, list(new_ids), multiplier
        self.attached: Any = None

    def attach(self, optimizer: Any) -> None:
        """Give the new rows their rate in ``optimizer`` (once; nothing to do at multiplier 1 or without rows)."""
        if self.multiplier == 1.0 or not self.new_ids or self.attached is optimizer:
            return
        self.attached = optimizer
        deltas = [p for n, p in self.model.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
        if deltas:
            self._own_group(optimizer, deltas)
        else:
            self._scaled_rows(optimizer)

    def _own_group(self, optimizer: Any, deltas: list[Any]) -> None:
        for group in list(optimizer.param_groups):
            mine = [p for p in group["params"] if any(p is d for d in deltas)]
            if mine:
                group["params"] = [p for p in group["params"] if not any(p is d for d in deltas)]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": mine, "lr": group["lr"] * self.multiplier})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]

    def _scaled_rows(self, optimizer: Any) -> None:
        import torch

        from kgtok.quantize.hf import embedding_matrices

        rows = torch.tensor(self.new_ids, dtype=torch.long)
        matrices = [w for w in embedding_matrices(self.model) if w.requires_grad]
        before: list[Any] = []

        def keep(*_: Any) -> None:
            before[:] = [w.detach()[rows.to(w.device)].clone() for w in matrices]

        def scale(*_: Any) -> None:
            with torch.no_grad():
                for w, old in zip(matrices, before):
                    index = rows.to(w.device)
                    w[index] = old + self.multiplier * (w[index] - old)

        optimizer.register_step_pre_hook(keep)
        optimizer.register_step_post_hook(scale)


class AnswerLoss:
    """:func:`answer_loss` as the Trainer's loss; in evaluation (no gradients) it also sums the loss of the
    answers' code tokens alone (``code_ids``), in all and per code level (``levels``, the level of each id: the
    coarse levels are the ones structured codes should make easier than random IDs), read by
    :meth:`code_token_loss` and :meth:`level_losses` after each LM-valid pass."""

    def __init__(self, code_ids: list[int], levels: list[int] | None = None) -> None:
        self.code_ids = list(code_ids)
        self.levels = list(levels) if levels is not None else [0] * len(self.code_ids)
        if len(self.levels) != len(self.code_ids):
            raise ValueError(f"AnswerLoss: {len(self.levels)} levels for {len(self.code_ids)} code ids")
        self.width = max(self.levels, default=-1) + 1
        order = np.argsort(self.code_ids)  # sorted, so that a token's level is found by binary search
        self.sorted_ids, self.sorted_levels = np.asarray(self.code_ids)[order], np.asarray(self.levels)[order]
        self.reset()

    def reset(self) -> None:
        self.totals, self.counts = np.zeros(self.width), np.zeros(self.width)

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        import torch

        loss = answer_loss(outputs, labels, num_items_in_batch)
        if self.code_ids and not torch.is_grad_enabled():
            logits = outputs.logits[:, :-1].float()  # (batch, answer, V)
            target = labels[:, -logits.shape[1]:]  # (batch, answer)
            ids = torch.as_tensor(self.sorted_ids, device=target.device)
            codes = torch.isin(target, ids)
            if codes.any():
                losses = torch.nn.functional.cross_entropy(logits[codes], target[codes], reduction="none")
                level = torch.as_tensor(self.sorted_levels, device=target.device)[
                    torch.searchsorted(ids, target[codes])]
                self.totals += torch.bincount(level, weights=losses.double(), minlength=self.width).cpu().numpy()
                self.counts += torch.bincount(level, minlength=self.width).cpu().numpy()
        return loss

    def _reduced(self, accelerator: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        sums = torch.tensor(np.concatenate([self.totals, self.counts]), device=accelerator.device)
        both = accelerator.reduce(sums, reduction="sum").cpu().numpy()
        return both[:self.width], both[self.width:]

    def code_token_loss(self, accelerator: Any) -> float:
        """Mean loss of the code tokens since :meth:`reset`, summed over processes (nan when there were none)."""
        totals, counts = self._reduced(accelerator)
        return float(totals.sum() / counts.sum()) if counts.sum() else math.nan

    def level_losses(self, accelerator: Any) -> list[float]:
        """Mean loss of the code tokens of each level since :meth:`reset` (nan for a level with none)."""
        totals, counts = self._reduced(accelerator)
        return [float(t / c) if c else math.nan for t, c in zip(totals, counts)]


def trainer_class() -> type:
    """The Hugging Face Trainer plus the new rows' learning rate (:class:`NewTokenRate`) and, per LM-valid
    pass, ``eval_code_token_loss`` (:class:`AnswerLoss`): when it stops falling the codes are learnt."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthSampler(LengthGroupedSampler):
        """Batches of similar length whose order in epoch e comes from (seed, e), not from the global random
        state: a run resumed inside epoch 2 or later drew its epoch's order before the checkpoint's random state
        was restored, and skipped the wrong batches."""

        def __init__(self, batch_size: int, dataset: Any, seed: int) -> None:
            super().__init__(batch_size, dataset=dataset)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Any:
            self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return super().__iter__()

    class CodeTrainer(Trainer):
        new_token_rate: NewTokenRate | None = None

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = super()._get_train_sampler(train_dataset)
            if not isinstance(sampler, LengthGroupedSampler):
                return sampler
            return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            train_dataset if train_dataset is not None else self.train_dataset,
                                            self.args.seed)

        def create_optimizer(self, model: Any = None) -> Any:
            optimizer = super().create_optimizer(model)
            if self.new_token_rate is not None:
                self.new_token_rate.attach(optimizer)
            return optimizer

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            loss = self.compute_loss_func
            if isinstance(loss, AnswerLoss):
                loss.reset()
            output = super().evaluation_loop(*args, **kwargs)
            if isinstance(loss, AnswerLoss) and loss.code_ids:
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                output.metrics[f"{prefix}_code_token_loss"] = loss.code_token_loss(self.accelerator)
                if loss.width > 1:
                    for level, value in enumerate(loss.level_losses(self.accelerator), start=1):
                        output.metrics[f"{prefix}_code_token_loss_level_{level}"] = value
            return output

    return CodeTrainer


def answer_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy of the answer tokens from the kept logits (see :class:`PaddingCollator`)."""
    import torch

    logits = outputs.logits[:, :-1].float()  # (batch, answer, V): position p predicts token p + 1
    target = labels[:, -logits.shape[1]:]  # (batch, answer)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    return loss / count


def uses_full_training(config: FinetuneConfig) -> bool:
    """Every weight trains (``adapter: full``, or ``auto`` with a from-scratch backbone); else LoRA."""
    return config.adapter == "full" or (config.adapter == "auto" and (
        config.backbone == "tiny" or is_from_scratch(config.backbone)))


def checkpointing_field(arguments: type) -> str:
    """TrainingArguments' name for activation checkpointing: transformers renamed gradient_checkpointing (kept
    as an alias) in a later 5.x, and the lent GPU machines' image has 5.17, which knows only the old name."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def step_timings(model: Any, batch_size: int, length: int) -> dict[str, float]:
    """Milliseconds of a forward and backward pass of ``model`` on a random batch of ``length`` tokens, in fp32
    and bf16 autocast; gradients cleared after, the global random state untouched (dropout draws from it)."""
    import torch

    from kgtok.runtime import preserved_global_rng, timed_precisions

    ids = torch.randint(0, 100, (batch_size, length), generator=torch.Generator().manual_seed(0))  # any tokens

    def step() -> None:
        model(input_ids=ids).logits[:, -8:].float().sum().backward()

    with preserved_global_rng():
        timings = timed_precisions(step)
    model.zero_grad(set_to_none=True)
    return timings


def training_precision(config: FinetuneConfig, model: Any, state: Any, saved: Path, length: int = 64
                       ) -> tuple[str, dict[str, float]]:
    """The precision fine-tuning runs in (:func:`kgtok.runtime.resolve_precision`, timed on batches of
    ``length`` tokens, once a machine: :func:`kgtok.runtime.measured_once`), the same in every process (the
    main one measures) and after a resume (kept at ``saved``); under ``auto``, ``accelerate launch
    --mixed_precision`` wins."""
    import os

    from kgtok.llm.scoring import architecture
    from kgtok.runtime import measured_once, remembered_precision, resolve_device, resolve_precision

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    setting = launched if config.precision == "auto" and launched in ("bf16", "fp16") else config.precision

    def measure() -> dict[str, float]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        signature = {"pass": "training", **architecture(model), "trainable": trainable,
                     "batch": config.batch_size, "tokens": length}
        return measured_once(signature, lambda: step_timings(model, config.batch_size, length))

    chosen = [remembered_precision(saved, lambda: resolve_precision(setting, resolve_device("auto"), measure))
              if state.is_main_process else None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen)
    return chosen[0]


def with_precision(arguments: Any, precision: str) -> Any:
    """``arguments`` training in ``precision`` (fp32: no autocast, whatever ACCELERATE_MIXED_PRECISION says)."""
    import dataclasses

    changed = dataclasses.replace(arguments, bf16=precision == "bf16", fp16=precision == "fp16")
    changed.mixed_precision = "no" if precision == "fp32" else precision
    return changed


def training_arguments(config: FinetuneConfig, work: Path, learning_rate: float, validate: bool) -> Any:
    """The Trainer's arguments in fp32 (:func:`with_precision` sets another): device from the machine (or
    accelerate launch), cosine schedule, checkpoints in ``work``, LM-valid loss each epoch (or ``eval_steps``)
    when ``validate``, no console output of its own."""
    import torch
    from transformers import TrainingArguments

    use_gpu = torch.cuda.is_available()
    checkpointing = checkpointing_field(TrainingArguments)
    stopping = validate and config.early_stopping_patience > 0  # the best validation's checkpoint is kept
    return TrainingArguments(
        output_dir=str(work / "checkpoints"), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs, max_steps=config.max_steps, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,
        logging_steps=config.logging_steps, save_strategy="steps",
        save_steps=config.eval_steps if stopping else config.save_steps,
        load_best_model_at_end=stopping, metric_for_best_model="eval_loss" if stopping else None,
        greater_is_better=False if stopping else None,
        save_total_limit=2, eval_strategy=("steps" if config.eval_steps else "epoch") if validate else "no",
        eval_steps=config.eval_steps or None, report_to=[], seed=config.seed,
        use_cpu=not use_gpu, **{checkpointing: config.gradient_checkpointing},  # precision: with_precision
        dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True,  # the Trainer's printer is replaced by TrainingConsole
        ddp_find_unused_parameters=False,  # CPU processes under accelerate launch use gloo
        # batches of similar length: short and long examples are not padded together
        train_sampling_strategy="group_by_length",
    )


def make_trainer(config: FinetuneConfig, arguments: Any, model: Any, tokenizer: Any,
                 train_records: list[dict[str, Any]], valid_records: list[dict[str, Any]], progress: bool,
                 log: Callable[[str], None], new_ids: Sequence[int] = (), code_ids: Sequence[int] = (),
                 code_levels: list[int] | None = None) -> Any:
    """The Hugging Face Trainer on the encoded records: answer-only loss, left padding, our console; the new
    rows (``new_ids``) at their learning rate, the code tokens' (``code_ids``, at ``code_levels``) LM-valid
    loss."""
    from transformers import PrinterCallback

    from kgtok.llm.console import LossAtCheckpoints, TrainingConsole

    train_set = encode_examples(tokenizer, train_records, config.max_length)
    valid_set = encode_examples(tokenizer, valid_records, config.max_length)
    for name, examples in (("LM-train", train_set), ("LM-valid", valid_set)):
        counts = budget_counts(examples)
        if counts["trimmed"] or counts["over"]:
            log(f"finetune: {counts['trimmed']} of {len(examples)} {name} prompts trimmed to max_length="
                f"{config.max_length} (facts, then description); {counts['over']} over it with query and list alone")
    trainer = trainer_class()(model=model, args=arguments, train_dataset=train_set, eval_dataset=valid_set or None,
                              data_collator=PaddingCollator(tokenizer.pad_token_id),
                              compute_loss_func=AnswerLoss(list(code_ids), code_levels))
    trainer.new_token_rate = NewTokenRate(model, list(new_ids), config.new_token_lr_multiplier)
    trainer.remove_callback(PrinterCallback)  # a dictionary per logging step
    trainer.add_callback(TrainingConsole(progress, log))
    trainer.add_callback(LossAtCheckpoints())
    if arguments.load_best_model_at_end:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(config.early_stopping_patience))
    return trainer


def stopped_early(saved: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``trainer_state.json`` says early stopping had ended training there."""
    stopping = (saved.get("stateful_callbacks") or {}).get("EarlyStoppingCallback") or {}
    if isinstance(stopping, list):  # one entry per callback instance
        stopping = stopping[0] if stopping else {}
    count = (stopping.get("attributes") or {}).get("early_stopping_patience_counter", 0)
    return bool(stopping) and count >= (stopping.get("args") or {}).get("early_stopping_patience", math.inf)


def resume_point(checkpoints: Path, main: bool, log: Callable[[str], None]) -> tuple[Path | None, int]:
    """The newest Trainer checkpoint a killed run can resume from, and its step (``None, 0``: none).

    Skipped, and removed by the main process: a checkpoint without a readable ``trainer_state.json``
    (the Trainer writes it last, so a kill while saving left it cut short, and resuming from it failed
    every time), and one saved at the final step (resumed there, the Trainer ran neither the LM-valid pass
    the kill interrupted nor stopped: one step too many, different metrics) or where early stopping ended
    training (resumed there, it would train on; from the checkpoint before, the best one, which early
    stopping keeps, the same steps are retrained and it stops where it stopped).
    """
    found = sorted(((int(p.name.split("-")[1]), p) for p in checkpoints.glob("checkpoint-*")
                    if p.name.split("-")[1].isdigit()), reverse=True)
    for step, path in found:
        saved = read_json(path / "trainer_state.json")
        complete = isinstance(saved, dict) and "global_step" in saved
        if complete and saved["global_step"] < saved.get("max_steps", math.inf) and not stopped_early(saved):
            return path, step
        if main:
            why = ("cut short by a kill while it was written" if not complete else
                   "where early stopping ended training (retrained from the best)" if stopped_early(saved) else
                   "the final step's (its LM-valid pass and save are redone)")
            log(f"finetune: {path} is {why}: removed")
            shutil.rmtree(path, ignore_errors=True)
    return None, 0


def mean_train_loss(history: list[dict[str, Any]], done_before: int, run_loss: float, steps: int) -> float:
    """The mean training loss over all ``steps``, also when this run resumed at step ``done_before``.

    The Trainer's ``training_loss`` (``run_loss``) averages the steps of this
    run only; the steps before the checkpoint come from its log history, each
    logged loss weighted by the steps it covers (:class:`LossAtCheckpoints`
    logs at every checkpoint, so the records reach ``done_before``).
    """
    if not done_before:
        return run_loss
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h and h["step"] <= done_before]
    spans = [step - previous for previous, step in zip([0] + [s for s, _ in logged], [s for s, _ in logged])]
    covered = sum(spans)
    if not covered:
        return run_loss
    # Checkpoints of an older kgtok need not end on a loss record: their mean stands for the steps not covered.
    before = sum(loss * span for (_, loss), span in zip(logged, spans)) * done_before / covered
    return (before + run_loss * (steps - done_before)) / steps


def run(config: FinetuneConfig, inputs: dict[str, Path], dest: Path, ctx: Context) -> dict[str, Any]:
    """Stage 5b into ``dest``; Trainer checkpoints in ``ctx.work``, a killed run resumes from the newest."""
    from accelerate import PartialState
    from transformers import set_seed

    from kgtok.llm.console import level_metrics, quiet_libraries
    from kgtok.runtime import precision_line

    instructions = InstructArtifact(inputs["instructions"])
    if inputs.get("codes") is not None:  # new token rows start from these codes' codebooks
        warn_if_made_from_another(inputs["instructions"], "codes", inputs["codes"])
    else:
        ids = ((read_manifest(inputs["instructions"]) or {}).get("config") or {}).get("ids", "none")
        if ids != "none":  # without the code tokens in the vocabulary, each would be split into byte pieces
            raise ValueError(f"{inputs['instructions']}: its prompts carry code tokens (ids={ids}): give --codes, "
                             "the stage-4 artifact the instructions were made with")
    train_records = read_jsonl(instructions.split("lm_train"))
    valid_records = read_jsonl(instructions.split("lm_valid"))
    if not train_records:
        raise ValueError(f"{instructions.split('lm_train')}: no training records")
    full = uses_full_training(config)
    learning_rate = config.resolved_learning_rate(full)
    scored = loss_records(valid_records)
    with quiet_libraries():
        # TrainingArguments sets up the (possibly distributed) process state; everything after may use it.
        arguments = training_arguments(config, ctx.work, learning_rate, bool(scored))
        state = PartialState()
        set_seed(config.seed)
        entities = read_entities(instructions) if config.embedding_init == "names" else None
        prefixed = any("gold_class" in r for r in train_records)  # class_prefix (alignment records have none)
        with state.main_process_first():  # the tiny backbone is built once, by the main process
            model, tokenizer, new_ids, backbone = load_backbone(
                config, [training_text(r) for r in train_records + valid_records], ctx.work, inputs.get("codes"),
                entities, classes=class_vocabulary(instructions) if prefixed else None)
        code_tokens = code_vocabulary(inputs["codes"])[0] if inputs.get("codes") is not None else []
        code_ids = tokenizer.convert_tokens_to_ids(code_tokens)
        model = wrap_trainable(model, config, full, new_ids)
        # timed on examples as long as the typical training example (bf16's gain grows with the matrices)
        sample = [training_text(r) for r in train_records[:: max(1, len(train_records) // 64)]]
        length = min(config.max_length, int(np.median([len(ids) for ids in tokenizer(sample)["input_ids"]])))
        precision, precision_ms = training_precision(config, model, state, ctx.work / "precision.json", length)
        if precision_ms and state.is_main_process:
            ctx.log(precision_line("finetune", precision, precision_ms, "a step"))
        arguments = with_precision(arguments, precision)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if len(scored) < len(valid_records) and state.is_main_process:
            ctx.log(f"finetune: LM-valid loss on the {len(scored)} of {len(valid_records)} LM-valid queries whose "
                    "gold is in the list (as every LM-train example's is)")
        trainer = make_trainer(config, arguments, model, tokenizer, train_records, scored, ctx.progress,
                               ctx.log, new_ids=new_ids, code_ids=code_ids, code_levels=code_levels(code_tokens))
        checkpoint, done_before = resume_point(ctx.work / "checkpoints", state.is_main_process, ctx.log)
        if checkpoint is not None and state.is_main_process:
            ctx.log(f"finetune: resuming from {checkpoint}")
        with ctx.timed("train"):
            start = time.perf_counter()
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
            seconds = time.perf_counter() - start
        merged = trainer.model.merge_and_unload() if not full else trainer.model
        merged.save_pretrained(FinetuneArtifact(dest).model)
        tokenizer.save_pretrained(FinetuneArtifact(dest).model)
    train_set = trainer.train_dataset
    # Tokens of the examples this run processed (steps since the checkpoint it resumed from).
    examples = ((result.global_step - done_before) * config.batch_size * config.gradient_accumulation_steps
                * state.num_processes)
    train_loss = mean_train_loss(trainer.state.log_history, done_before, result.training_loss, result.global_step)
    best = trainer.state.best_global_step if arguments.load_best_model_at_end else None
    # The validation whose weights are kept (the last, or with early stopping the best) gives the run's losses.
    validations = [h for h in trainer.state.log_history if "eval_loss" in h and (not best or h["step"] == best)]
    eval_losses = [h["eval_loss"] for h in validations]
    code_losses = [h for h in validations if "eval_code_token_loss" in h]
    by_level = level_metrics(code_losses[-1]) if code_losses else []
    metrics = {
        "backbone": config.backbone, "adapter": "full" if full else "lora", "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in merged.parameters()), "new_tokens": len(new_ids),
        "train_examples": len(train_set), "steps": result.global_step, "train_loss": train_loss,
        "valid_loss": eval_losses[-1] if eval_losses else math.nan, "valid_loss_records": len(scored),
        **({"best_step": best, "stopped_by": "patience" if result.global_step < trainer.state.max_steps
            else "max_steps"} if arguments.load_best_model_at_end else {}),
        "train_tokens_per_second": (examples * sum(len(e["input_ids"]) for e in train_set) / len(train_set)
                                    / seconds if seconds else math.nan),
        "processes": state.num_processes, "learning_rate": learning_rate, "precision": precision,
        **({"precision_step_ms": precision_ms} if precision_ms else {}),
        **{f"prompts_{key}": n for key, n in budget_counts(train_set).items()},
        **({"valid_code_token_loss": code_losses[-1]["eval_code_token_loss"]} if code_losses else {}),
        **({"valid_code_token_loss_by_level": by_level} if by_level else {}),
    }
    write_json_atomic(FinetuneArtifact(dest).metrics_path, {**metrics, "history": list(trainer.state.log_history)})
    ctx.log(f"finetune: {metrics['adapter']} training of {backbone.name}, {result.global_step} steps, "
            f"train loss {train_loss:.3f}, valid loss {metrics['valid_loss']:.3f}, "
            f"{metrics['train_tokens_per_second']:.0f} tokens/s ({precision})"
            + (f"; the weights of step {best}, the lowest LM-valid loss (stopped by {metrics['stopped_by']})"
               if best else ""))
    return metrics


STAGE = Stage(
    name="finetune", title="stage 5b: fine-tuning", config=FinetuneConfig, run=run, uses_kg=False,
    inputs=(Input("instructions", "instruct", InstructArtifact, "a stage-5a directory"),
            Input("codes", "quantize", QuantizeArtifact,
                  "the stage-4 artifact whose code tokens the instructions use (omit for instructions without codes)")),
    needs=lambda config: ("instructions",), summary=("steps", "train_loss", "valid_loss", "train_tokens_per_second"),
    fingerprint=lambda config: backbone_fingerprint(config.backbone),
)


def run_finetune(
    config: FinetuneConfig,
    instructions: str | Path,
    dest: str | Path,
    *,
    codes: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Path:
    """Stage 5b into ``dest`` (reused when current, unless ``force``).  ``codes``: the stage-4 artifact whose tokens the
    instructions use (None for instructions without codes)."""
    return run_stage(STAGE, config, dest, inputs={"instructions": instructions, "codes": codes},
                     progress=progress, log=log, reuse=not force).path
