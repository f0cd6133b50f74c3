"""The TRL baseline: trl.DistillationTrainer with beta 1 (on-policy reverse KL) from the SFT student."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from minidistill.errors import UserError
from minidistill.training.checkpoint import write_json_atomic

from .methods import fingerprint
from .plan import Plan, method_lr, method_steps, stage_seed, warmup


def trl_prompts(train_file: Path, tokenizer, plan: Plan) -> list[str]:
    """The training prompts as text, rendered with our template, long ones dropped as our stages do;
    checked to tokenize (as TRL does: ``tokenizer(text)``) to exactly our prompt ids."""
    from minidistill.data import load_instructions, render_prompt, tokenize_prompts

    examples = load_instructions(str(train_file))
    ids, _, stats = tokenize_prompts(
        examples, tokenizer, template=plan.template, max_prompt_length=plan.max_prompt_length, long_prompt="drop"
    )
    texts = [render_prompt(examples[i], plan.template, tokenizer) for i in stats.kept_indices]
    theirs = tokenizer(texts)["input_ids"]
    for k, (a, b) in enumerate(zip(ids, theirs)):
        if list(a) != list(b):
            raise UserError(
                f"trl: prompt {k} tokenizes differently through tokenizer(text) ({len(b)} ids) than in "
                f"minidistill ({len(a)} ids); the TRL baseline would train on other prompts"
            )
    return texts


def train_trl(plan: Plan, init_final: Path, train_file: Path) -> Path:
    """trl.DistillationTrainer with beta = 1 (reverse KL), on-policy (TRL 1.16 always generates the
    completions with the student), from ``init_final`` (the SFT student); exports <out>/trl/final."""
    import torch
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from minidistill import models
    from minidistill.training import checkpoint as ckpt

    out = Path(plan.out) / "trl"
    final = out / "final"
    seed = stage_seed("trl", plan)
    lr = plan.lr if plan.lr is not None else method_lr("trl")
    steps = method_steps("trl", plan)
    settings = {
        "init": str(init_final),
        "init_fingerprint": fingerprint(init_final),
        "train_file": str(train_file),
        "train_sha256": hashlib.sha256(train_file.read_bytes()).hexdigest(),
        "teacher": plan.teacher,
        "steps": steps,
        "batch_size": plan.batch_size,
        "lr": lr,
        "warmup_steps": warmup(steps),
        "gen_tokens": plan.gen_tokens,
        "precision": plan.precision,
        "seed": seed,
        "max_prompt_length": plan.max_prompt_length,
        "template": plan.template,
    }
    saved = out / "settings.json"
    if (
        not plan.overwrite
        and ckpt.is_complete(final)[0]
        and saved.is_file()
        and json.loads(saved.read_text()) == settings
    ):
        print(f"trl: reusing {final}", file=sys.stderr)
        return final
    # A run killed mid-way resumes from its last Trainer checkpoint, if that run had these settings.
    trainer_dir, started = out / "trainer", out / "settings.started.json"
    same_run = not plan.overwrite and started.is_file() and json.loads(started.read_text()) == settings
    if not same_run and trainer_dir.exists():
        shutil.rmtree(trainer_dir)
    checkpoints = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    resume_from = str(checkpoints[-1]) if same_run and checkpoints else None
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(started, settings)

    tokenizer = models.load_tokenizer(str(init_final))
    student = models.load_model(str(init_final), dtype="fp32", with_tokenizer=False)
    teacher, t_tok = models.load_model(plan.teacher, dtype="fp32")
    models.check_tokenizers_match(t_tok, tokenizer, where="trl student")
    teacher = models.freeze(teacher).to(models.DTYPES[plan.precision])  # as run_recipe: frozen teacher in the run dtype
    dataset = Dataset.from_dict({"prompt": trl_prompts(train_file, tokenizer, plan)})
    args = DistillationConfig(
        output_dir=str(trainer_dir),
        max_steps=steps,
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup(steps),
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=1.0,  # 1 = reverse KL(student || teacher); there is no lmbda: always on-policy
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=plan.gen_tokens,
        bf16=plan.precision == "bf16",
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL defaults to True; our recipes do not checkpoint
        disable_dropout=True,
        seed=seed,
        data_seed=seed,
        report_to="none",
        push_to_hub=False,
        save_strategy="steps",  # model + optimizer + scheduler + RNG: what resume_from_checkpoint needs
        save_steps=max(1, steps // 5),
        save_total_limit=2,
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=not plan.progress,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # our recipe runs in this process configured their own accelerator
    torch.set_num_threads(plan.threads)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    if resume_from:
        print(f"trl: resuming from {resume_from}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume_from)
    write_json_atomic(out / "resumed_from.json", {"checkpoint": resume_from})
    if trainer.state.global_step != steps:
        raise UserError(f"trl: trained {trainer.state.global_step} steps, expected {steps}")
    ckpt.export_hf(trainer.model, tokenizer, final)
    write_json_atomic(out / "log_history.json", trainer.state.log_history)
    write_json_atomic(saved, settings)
    return final
