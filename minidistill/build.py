"""The teacher and student of a run: load the teacher, build the student (pretrained, pruned or
fresh), shard the teacher under FSDP, and set the student up for a training stage (gradient
checkpointing, LoRA)."""

from __future__ import annotations

from . import models
from .context import Run
from .errors import UserError, named
from .stages import stage


def load_teacher(run: Run) -> None:
    """Load the teacher in fp32 (a pruned student is copied from full-precision weights).
    Under FSDP it stays on the CPU until ``shard_teacher`` moves each process's shard over."""
    r = run.recipe
    teacher, tok = named(
        "teacher.model",
        lambda: models.load_model(
            r.teacher.model,
            gguf_file=r.teacher.gguf_file,
            dtype="fp32",
            device="cpu" if run.fsdp else run.device,
            trust_remote_code=r.teacher.trust_remote_code,
        ),
    )
    run.teacher = models.freeze(teacher)
    run.tokenizer = tok


def build_student(run: Run):
    """The initial student; afterwards the teacher is cast to its run dtype."""
    s, r = run.recipe.student, run.recipe
    if s.init == "pretrained":
        student, tok = named(
            "student.model",
            lambda: models.load_model(
                s.model, gguf_file=s.gguf_file, dtype="fp32", device=run.device, trust_remote_code=s.trust_remote_code
            ),
        )
        if run.tokenizer.get_vocab() != tok.get_vocab():
            setup_cross_tokenizer(run, tok)
    elif s.init == "prune":
        n = len(models.decoder_layers(run.teacher))
        keep = s.keep_layers if s.keep_layers else models.stride_layers(n, s.layer_stride)
        student = models.prune_layers(run.teacher, keep)
    else:
        student = models.fresh_from_config(run.teacher, s.config_overrides, r.seed).to(run.device)
    run.teacher.to(models.DTYPES[r.teacher.dtype if r.teacher.dtype != "auto" else run.precision])
    student.requires_grad_(True)
    if run.xtok is None and "token" in (stage(c.type).cross_tokenizer(c)[0] for c in r.stages):
        # one tokenizer, but a stage asks for a cross-tokenizer loss (kind uld, ...): the same
        # alignment machinery with the tokenizer on both sides; every other stage keeps its path
        from . import xtok

        run.xtok = xtok.Aligner(run.tokenizer, run.tokenizer, f"teacher.model '{r.teacher.model}'", "student")
        run.teacher_tokenizer = run.tokenizer
    if run.xtok is not None:  # each model against its own tokenizer
        run.vocab_size = models.check_vocab(student, student, run.tokenizer)
        run.teacher_vocab_size = models.check_vocab(run.teacher, run.teacher, run.teacher_tokenizer, where="teacher")
        run.xtok.shared(run.vocab_size, run.teacher_vocab_size)
        return student
    run.vocab_size = models.check_vocab(run.teacher, student, run.tokenizer)
    return student


def setup_cross_tokenizer(run: Run, student_tok) -> None:
    """Teacher and student tokenizers differ. Allowed only when a stage uses the teacher across
    tokenizers (``Stage.cross_tokenizer``: a cross-tokenizer loss, or teacher-written text) and no
    stage compares the two models over one vocabulary; otherwise one error. Afterwards
    ``run.tokenizer`` is the student's, ``run.teacher_tokenizer`` the teacher's and ``run.xtok``
    the ``xtok.Aligner`` (which refuses a tokenizer that cannot give character spans, naming its
    model)."""
    from . import xtok

    r = run.recipe
    teacher_tok = run.tokenizer
    modes, problems = [], []
    for cfg in r.stages:
        mode, problem = stage(cfg.type).cross_tokenizer(cfg)
        modes.append(mode)
        if problem:
            problems.append(f"stage '{cfg.name}' {problem}")
    base = f"tokenizer differs from the teacher's ({len(student_tok)} vs {len(teacher_tok)} tokens)"
    if problems:
        raise UserError(f"student.model: {base}, so every stage must work across tokenizers: {problems[0]}")
    if not any(modes):
        raise UserError(
            f"student.model: {base}; distillation needs the same tokenizer, or a cross-tokenizer setting: "
            "kd/seqkd kind: uld or uld_hybrid, pd kd_kind: uld or uld_hybrid, minillm cross_tokenizer: true "
            "(README, 'Cross-tokenizer distillation')"
        )
    run.xtok = xtok.Aligner(
        teacher_tok, student_tok, f"teacher.model '{r.teacher.model}'", f"student.model '{r.student.model}'"
    )
    run.teacher_tokenizer, run.tokenizer = teacher_tok, student_tok


def shard_teacher(run: Run) -> None:
    """Under FSDP, shard the frozen teacher like the student: one FSDP unit per decoder layer
    (accelerate's auto-wrap policy from the accelerate config), gathered layer by layer in each
    forward, so a teacher that does not fit on one GPU still runs. DDP and DeepSpeed ZeRO-2/3
    keep a full teacher replica on every process. With sharded weights (FSDP, ZeRO-3) stages
    that generate text are refused: every process would have to decode in step."""
    if not run.sharded:
        return
    gen = [st.name for st in run.recipe.stages if stage(st.type).generates]
    if gen:
        raise UserError(
            f"recipe.stages: {', '.join(gen)} generate text, which is not supported with sharded weights "
            "(FSDP, DeepSpeed ZeRO-3) yet: every process would have to decode in step; launch these "
            "stages with DDP (recipes/accelerate/ddp.yaml) or DeepSpeed ZeRO-2"
        )
    if not run.fsdp:
        return
    acc = run.accelerator
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        run.teacher = fsdp2_prepare_model(acc, run.teacher)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin.set_auto_wrap_policy(run.teacher)
        run.teacher = FSDP(
            run.teacher,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            use_orig_params=True,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=acc.device,
        )
    run.teacher.eval()


def prepare_for_stage(run: Run, student):
    s = run.recipe.student
    if s.gradient_checkpointing:
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.lora.enabled:
            student.enable_input_require_grads()
    if s.lora.enabled:
        student = models.add_lora(student, s.lora)
    return student
