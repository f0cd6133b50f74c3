"""The teacher and student of a run: load the teacher, build the student (pretrained, pruned or
fresh), shard the teacher under FSDP, and set the student up for a training stage (gradient
checkpointing, LoRA)."""

from __future__ import annotations

from minidistill import models
from minidistill import teacher as teacher_mod
from minidistill.errors import UserError, named
from minidistill.pipeline.context import Run
from minidistill.stages import stage


def load_teacher(run: Run) -> None:
    """``run.teacher`` (``teacher.load``: frozen, fp32) and, until the student says otherwise, its tokenizer."""
    if run.recipe.teacher.server:
        from minidistill.teacher import served

        served.check_stages(run.recipe.stages, stage, run.recipe.teacher.logprobs)
        run.teacher = served.load(run)
    else:
        run.teacher = teacher_mod.load(run)
    run.tokenizer = run.teacher.tokenizer


def build_student(run: Run):
    """The initial student; the teacher is paired with the student's tokenizer (``teacher.check_stages``
    refuses a pair a stage cannot use) and cast to its run dtype."""
    s, r = run.recipe.student, run.recipe
    teacher = run.teacher
    student_tok = None
    if s.init == "pretrained":
        student, student_tok = named(
            "student.model",
            lambda: models.load_model(
                s.model, gguf_file=s.gguf_file, dtype="fp32", device=run.device, trust_remote_code=s.trust_remote_code
            ),
        )
    elif teacher.served:
        raise UserError(
            f"student.init: '{s.init}' builds the student from the teacher's weights, which a served teacher "
            "(teacher.server) keeps on the server; use init: pretrained with student.model"
        )
    elif s.init == "prune":
        n = len(models.decoder_layers(teacher.model))
        keep = s.keep_layers if s.keep_layers else models.stride_layers(n, s.layer_stride)
        student = models.prune_layers(teacher.model, keep)
    else:
        student = models.fresh_from_config(teacher.model, s.config_overrides, r.seed).to(run.device)
    teacher_mod.check_stages(teacher, student_tok, r.stages, r.student.model, stage)
    if teacher.cross:
        run.tokenizer = student_tok
    if not teacher.served:
        teacher.model.to(models.DTYPES[r.teacher.dtype if r.teacher.dtype != "auto" else run.precision])
    student.requires_grad_(True)
    student_vocab = models.check_vocab(student, student, run.tokenizer) if teacher.aligner is not None else None
    run.vocab_size = teacher.check_vocab(student, student_vocab)
    return student


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
    if not run.fsdp or run.teacher.served:  # a served teacher's weights are on its server
        return
    acc = run.accelerator
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        run.teacher.model = fsdp2_prepare_model(acc, run.teacher.model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin.set_auto_wrap_policy(run.teacher.model)
        run.teacher.model = FSDP(
            run.teacher.model,
            sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
            cpu_offload=plugin.cpu_offload,
            auto_wrap_policy=plugin.auto_wrap_policy,
            mixed_precision=plugin.mixed_precision_policy,
            use_orig_params=True,
            limit_all_gathers=plugin.limit_all_gathers,
            device_id=acc.device,
        )
    run.teacher.model.eval()


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
