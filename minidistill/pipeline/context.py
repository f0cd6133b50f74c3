"""``Run``: what every stage gets (the recipe, accelerate, the teacher, the tokenizer, the shared
instruction and corpus data, logging, export)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minidistill import models
from minidistill.config import RecipeConfig
from minidistill.errors import UserError, named
from minidistill.pipeline.launch import device_type, use_cpu
from minidistill.reporting.tracking import Metrics, console
from minidistill.stages import stage
from minidistill.training import checkpoint as ckpt


class Run:
    """What every stage gets: the recipe, accelerate, the teacher (``teacher.Teacher``), the tokenizer, data, logging."""

    def __init__(self, recipe: RecipeConfig):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        self.recipe = recipe
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            AcceleratorState._reset_state()  # several runs in one Python process (tests, notebooks)
        cpu = use_cpu(recipe.device)
        self.precision = models.resolve_precision(recipe.precision, device_type(recipe.device, cpu))
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cpu)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        set_seed(recipe.seed)
        self.out_dir = Path(recipe.output_dir)
        self.metrics = Metrics(self.out_dir, enabled=self.accelerator.is_main_process, tensorboard=recipe.tensorboard)
        console.quiet = not self.accelerator.is_main_process  # one copy of the console lines, not one per process
        self.teacher = None  # a ``teacher.Teacher``: everything a stage asks of the teacher goes through it
        self.tokenizer = None  # the student's (and, with one tokenizer, the teacher's)
        self.vocab_size = None  # the student's usable vocabulary
        self._cache: dict = {}

    @property
    def cross_tokenizer(self) -> bool:
        """Teacher and student have different tokenizers (the teacher's is ``teacher.tokenizer``)."""
        return self.teacher is not None and self.teacher.cross

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: every process holds only a shard of the student's weights."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            return int(getattr(acc.state.deepspeed_plugin, "zero_stage", 0) or 0) == 3
        return self.fsdp

    def export(self, model, out: Path) -> None:
        """Write a Hugging Face folder of ``model`` (every process calls this; under FSDP the full
        weights are gathered first, then the main process writes)."""
        acc = self.accelerator
        state = None
        if self.sharded:  # DeepSpeed gathers through its engine, the prepared wrapper of ``model``
            prepared = next((m for m in acc._models if getattr(m, "module", None) is model), model)
            state = acc.get_state_dict(prepared)
        if acc.is_main_process:
            ckpt.export_hf(model, self.tokenizer, out, state_dict=state)
        acc.wait_for_everyone()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def log(self, stage: str, step: int, values: dict) -> None:
        self.metrics.log(stage, step, values)

    def cached(self, key: str, make):
        """``make()`` once per run. Keys starting with ``instructions/`` hold data made from the
        instruction examples (tokenized rows, prompt ids): ``set_instructions`` drops them."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ---- data shared by the stages -------------------------------------------------------
    def instructions(self, split: str):
        """Instruction examples for 'train' or 'valid' (valid falls back to a held-out slice)."""
        from minidistill import data

        d = self.recipe.data

        def load():
            if d.train is None:
                raise UserError("recipe.data.train: required by this stage (instruction data path)")
            # prompt-only data is fine when a generate stage lets the teacher write the responses
            need = not any(stage(st.type).writes_responses for st in self.recipe.stages)
            train = named("data.train", lambda: data.load_instructions(d.train, require_output=need))
            if d.valid:
                valid = named("data.valid", lambda: data.load_instructions(d.valid, require_output=need))
            elif d.valid_size:
                if d.valid_size >= len(train):
                    raise UserError(
                        f"recipe.data.valid_size: holding out {d.valid_size} examples leaves no training "
                        f"examples ({d.train} has {len(train)}); lower it or set data.valid"
                    )
                train, valid = train[d.valid_size :], train[: d.valid_size]
            else:
                valid = []
            if d.max_examples:
                train = train[: d.max_examples]
            if d.max_valid_examples:
                valid = valid[: d.max_valid_examples]
            return {"train": train, "valid": valid}

        return self.cached("instructions", load)[split]

    def set_instructions(self, split: str, examples: list) -> None:
        """Replace a split's examples for the stages that follow (e.g. with teacher responses)."""
        self.instructions(split)  # load the other split first
        self._cache["instructions"][split] = examples
        for key in [k for k in self._cache if k.startswith("instructions/")]:  # data made from them
            del self._cache[key]

    def set_corpus_texts(
        self, texts: list[str], source: str = "generated text", complete: list[bool] | None = None
    ) -> None:
        """Use these documents as the plain-text corpus for the stages that follow (``source`` names them in errors;
        ``complete``: False for a document cut at a token limit, which then gets no EOS)."""
        from minidistill.data import TextList

        self._corpus_texts = TextList(texts, [source], complete)
        self._cache.pop("corpus", None)

    def corpus(self):
        """(train_blocks, valid_blocks) packed from data.corpus (or texts a stage provided)."""
        from minidistill import data

        d = self.recipe.data

        def load():
            texts = getattr(self, "_corpus_texts", None)
            if texts is None:
                if not d.corpus:
                    raise UserError(
                        "recipe.data.corpus: this stage needs plain text (PD, or MiniLLM's L_PT with lm_coef > 0): "
                        "list text files, or add a generate stage with corpus: true"
                    )
                texts = named("data.corpus", lambda: data.load_texts(d.corpus))
                blocks = named("data.corpus", lambda: data.pack_blocks(texts, self.tokenizer, d.block_len))
            else:  # a stage's text names itself in errors
                blocks = data.pack_blocks(texts, self.tokenizer, d.block_len)
            if d.valid_blocks:
                if d.valid_blocks >= len(blocks):
                    raise UserError(
                        f"recipe.data.valid_blocks: {d.valid_blocks} held-out blocks leave no training text (the corpus packs into {len(blocks)} blocks of {d.block_len} tokens)"
                    )
                train, valid = data.split_blocks(blocks, n_valid=d.valid_blocks, seed=self.recipe.seed)
            else:
                train, valid = blocks, blocks[:0]
            if d.max_blocks:
                train = train[: d.max_blocks]
            if len(train) == 0:
                raise UserError(
                    f"recipe.data.corpus: no training blocks left after holding out {d.valid_blocks} for validation"
                )
            return train, valid

        return self.cached("corpus", load)
