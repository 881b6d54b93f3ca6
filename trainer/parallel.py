"""Distribution applied to a plain DiT from outside, in one place, as torchtitan's
`parallelize` does: the model's code knows nothing of pipelines, recomputation or ranks.

    parallelize(trainable, cfg, ctx)
      sequence parallelism   (DeepSpeed-Ulysses; trainer/sequence_parallel.py) when S > 1
      activation checkpointing per block: model.checkpoint_policy none | attention | full
      idle temporal parameters tied into the graph (data-parallel ranks reduce the same grads)
      each block's trainable parameters as one flat parameter (model.flat_params)
      regional torch.compile of each block (model.compile)
      the DeepSpeed pipeline layer list                 when deepspeed.pipeline_stages > 1

Everything here changes modules in place (instance `forward`s, hooks, wrapped submodules), so
parameter names, state dicts and checkpoints are those of the plain model; with flat block
parameters the engine's own names and files are the flat ones, and everything else (EMA file,
universal optimizer state, exports) is by weight name (trainer/flat_params.py).
"""
from __future__ import annotations

import functools
import types
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.config import CHOICES, ModelConfig, RunConfig
from trainer.distributed import DistContext
from trainer.flat_params import flatten_parameters
from trainer.models.dit import DiT, DiTBlock, DiTEmbed, DiTHead, TextEmbedding
from trainer.models.layers import Grid

def checkpoint_policy(cfg: ModelConfig) -> str:
    """The activation checkpointing policy of a model config (activation_checkpointing=true is full)."""
    return "full" if cfg.activation_checkpointing else cfg.checkpoint_policy


# ---------------------------------------------------------------------------------------------
# Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
# "full" keeps only each block's input and recomputes the block in backward; "attention" keeps
# each attention's input (self, temporal, cross) and recomputes the attention.


def _recomputed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = functools.partial(type(self).forward, self)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def recompute(module: nn.Module) -> nn.Module:
    """Make `module`'s forward drop its activations and recompute them in backward (while
    gradients are enabled); its parameters and their names are untouched. A bound method, so
    that a deep copy of the module recomputes its own forward, not the original's."""
    module.forward = types.MethodType(_recomputed_forward, module)  # type: ignore[method-assign]
    return module


def apply_checkpointing(net: DiT, policy: str) -> DiT:
    """Wrap `net`'s blocks (or their attentions) for recomputation by `policy`, in place."""
    if policy not in CHOICES["model.checkpoint_policy"]:
        raise ValueError(f"model.checkpoint_policy={policy!r}; choose one of {', '.join(CHOICES['model.checkpoint_policy'])}")
    for block in net.blocks:
        if policy == "full":
            recompute(block)
        elif policy == "attention":
            for attention in (block.attn, block.temporal, block.cross_attn):
                if attention is not None:
                    recompute(attention)
    return net


def tie_idle_temporal(net: DiT) -> None:
    """An image batch skips the temporal attention of factorized video blocks, but its
    parameters must still get a (zero) gradient, and in the order a clip's gives them: in joint
    image-video training one data-parallel rank may hold images while another holds clips, and
    they reduce the same gradients. ZeRO-2 copies each gradient into its reduce bucket as it
    becomes ready and sums the buckets element by element: a tie made at the block's output (0 *
    the parameters' sum, from a hook) made them ready before the block's MLP's on an image rank,
    so the ranks summed different parameters' gradients (88 of 132 tensors of a tiny video DiT
    off after the first mixed step, up to 1.5e-3, where ZeRO-0, -1 and -3 logged one gradient
    norm). Here an image runs the temporal attention where a clip does (`DiTBlock.idle_temporal`),
    on one token per sample (a one-frame, one-position grid: the same operations at 1 / N of the
    cost) and weighted 0: the same graph, the output unchanged.

    Under ZeRO-3 such a block is a leaf module (`zero3_leaf_blocks`)."""

    def tie(block: DiTBlock, h: Tensor, c: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return h
        one = (1, 1, 1)
        first = h[:, :1]  # (B, 1, D)
        out = block.temporal(first, c, one, block._rope(one, "t", h))  # (B, 1, D)
        return h + 0.0 * (out - first)  # (B, N, D), unchanged

    for block in net.blocks:
        if block.temporal is not None:
            block.idle_temporal = types.MethodType(tie, block)  # type: ignore[method-assign]
    zero3_leaf_blocks(net)


def zero3_leaf_blocks(module: nn.Module) -> None:
    """Every factorized video block in `module` (a DiT, or a player holding one: the adversarial
    discriminator's frozen trunk) as a ZeRO-3 leaf module (DeepSpeed's `set_z3_leaf_module`,
    made for MoE layers whose experts run or not by the data). ZeRO-3 gathers a module's
    parameters as its forward starts and requires every rank to run the same submodules in the
    same order, which a rank of images beside a rank of clips does not (the trunk's skipped
    temporal attention: a collective mismatch at the first mixed step); a leaf block is
    gathered whole, and traced as one module."""
    from deepspeed.utils import set_z3_leaf_module

    for block in module.modules():
        if isinstance(block, DiTBlock) and block.temporal is not None:
            set_z3_leaf_module(block, True)


def prepare_for_training(net: DiT, cfg: ModelConfig) -> DiT:
    """What a trained DiT gets on any layout, in place: `cfg`'s activation checkpointing policy
    and the idle temporal parameters tied into the graph."""
    apply_checkpointing(net, checkpoint_policy(cfg))
    tie_idle_temporal(net)
    return net


def compile_blocks(net: DiT) -> None:
    """torch.compile each transformer block in place: regional compilation, as torchtitan
    compiles per TransformerBlock; identical blocks share one compiled graph, so the compile
    time does not grow with depth."""
    for block in net.blocks:
        block.compile()


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism. DeepSpeed's PipelineModule runs a flat list of layers, each taking and
# returning one tuple of tensors. Between layers the state is
#   (h (B, N, D), c (B, D), tokens (B, L, Dt), mask (B, L) float, grid marker)
# where the grid marker is a zeros tensor shaped (F', H', W') for video input or (H', W') for
# image input: its shape carries the token grid across pipeline stages without a host sync.

State = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def grid_marker(grid: Grid, held: int, like: Tensor) -> Tensor:
    """A tensor whose shape says the grid and `Tokens.held`: (H', W') an image, (1, 1, H', W') a
    one-frame clip, (F', H', W') a clip."""
    return like.new_zeros({4: grid[1:], 5: (1, *grid)}.get(held, grid))


def marker_grid(marker: Tensor) -> tuple[Grid, int]:
    """The (F', H', W') grid and `Tokens.held`, from a grid marker."""
    shape = tuple(marker.shape)
    if len(shape) == 2:
        return (1, *shape), 4  # type: ignore[return-value]
    return (shape[1:], 5) if len(shape) == 4 else (shape, 0)  # type: ignore[return-value]


def pipeline_inputs(net: DiT, x: Tensor, t: Tensor, text: TextEmbedding, **extras: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The first pipeline layer's input: (x, t, tokens, mask float, pooled[, lowres,
    aug_level][, guidance]); all floating point, so it can travel between stages."""
    t, named = net.embed.conditioning(x, t, **extras)
    return (x, t, text.tokens.to(x.dtype), text.mask.to(x.dtype), text.pooled.to(x.dtype), *named.values())


class PipelineEmbed(nn.Module):
    """`DiTEmbed` as the first pipeline layer, its pass-through tensors tied into the graph.

    The first stage runs `backward` on every floating-point tensor it sends on
    (deepspeed/runtime/pipe/engine.py, `_exec_backward_pass`); text tokens, mask and the grid
    marker pass through untouched and would have no grad_fn, so they are tied to c at weight
    0: values unchanged, exact zero gradient contribution.
    """

    def __init__(self, embed: DiTEmbed):
        super().__init__()
        self.embed = embed
        spec = embed.spec
        self.optional = (("lowres", "aug_level") if spec.superres else ()) + (("guidance",) if spec.guidance else ())

    def forward(self, inputs: Sequence[Tensor]) -> State:
        x, t, tokens, mask, pooled, *extra = inputs
        s = self.embed(x, t, TextEmbedding(tokens, mask, pooled), **dict(zip(self.optional, extra)))
        tie = s.c.sum() * 0.0  # scalar 0 with a grad_fn
        carried = (s.text, s.mask, grid_marker(s.grid, s.held, s.h))
        return (s.h, s.c, *(x + tie for x in carried))


class PipelineBlock(nn.Module):
    """A `DiTBlock` on the pipeline state: h is replaced, the rest passes through."""

    def __init__(self, block: DiTBlock):
        super().__init__()
        self.block = block

    def forward(self, state: State) -> State:
        h, c, tokens, mask, marker = state
        return (self.block(h, c, tokens, mask, marker_grid(marker)[0]), c, tokens, mask, marker)


class PipelineHead(nn.Module):
    """`DiTHead` as the last pipeline layer, with the carried tensors tied in at weight 0.

    DeepSpeed's PipelineEngine marks every floating-point tensor a stage receives as requiring
    grad and sends its `.grad` back, asserting it is not None (deepspeed/runtime/pipe/engine.py,
    `_exec_send_grads`). The mask and grid marker have no differentiable use, so the last layer
    adds 0 * their sums: exact zero gradients, the prediction unchanged.
    """

    def __init__(self, head: DiTHead):
        super().__init__()
        self.head = head

    def forward(self, state: State) -> Tensor:
        h, c, _, _, marker = state
        tie = sum(s.sum() for s in state[1:]) * 0.0  # scalar 0
        return self.head(h, c, *marker_grid(marker)) + tie


def pipeline_layers(net: DiT) -> list[nn.Module]:
    """[embed, block_0, ..., block_{depth-1}, head]: composing them on `pipeline_inputs(...)`
    equals `net.forward`. Each block layer owns its block's parameters; embedders live in the first."""
    return [PipelineEmbed(net.embed), *(PipelineBlock(b) for b in net.blocks), PipelineHead(net.head)]


def as_pipeline(net: DiT, loss_fn: Callable[..., Tensor], ctx: DistContext, shapes_vary: bool) -> nn.Module:
    """The network's layer list as a DeepSpeed PipelineModule: noising happens before the pipe
    (the stage's `pipeline_batch`), the loss at its end (`loss_fn`). When batches may come in
    several shapes (aspect or frame buckets), the stages exchange each activation's shape with
    it (DeepSpeed's dynamic_shape) instead of reusing the first one's."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(layers=pipeline_layers(net), num_stages=ctx.pipeline_stages, loss_fn=loss_fn,
                          partition_method="parameters", dynamic_shape=shapes_vary)


# ---------------------------------------------------------------------------------------------


def parallelize(trainable: dict[str, nn.Module], stage: Any, cfg: RunConfig, ctx: DistContext) -> dict[str, nn.Module]:
    """The modules to hand DeepSpeed: the stage's trained players, the student changed in place
    by the config's parallelisms and, under pipeline parallelism, replaced by its layer list."""
    from data_pipeline.transforms import TransformSpec
    from trainer.sequence_parallel import parallelize_sequence, sequence_group

    out = dict(trainable)
    student = out["student"]
    for player in out.values():
        zero3_leaf_blocks(player)
    if ctx.sequence_parallel > 1:
        parallelize_sequence(student, sequence_group(ctx))
    if isinstance(student, DiT):  # the autoencoder stage trains no DiT
        prepare_for_training(student, cfg.model)
        if cfg.model.flat_params:
            for block in student.blocks:
                flatten_parameters(block)
    if cfg.model.compile:
        compile_blocks(student)
    if ctx.pipeline_stages > 1:
        out["student"] = as_pipeline(student, stage.pipeline_loss, ctx, TransformSpec.from_config(cfg.data).bucketed)
    return out


__all__ = ["apply_checkpointing", "as_pipeline", "checkpoint_policy", "compile_blocks", "parallelize",
           "pipeline_inputs", "pipeline_layers", "prepare_for_training", "recompute", "tie_idle_temporal",
           "zero3_leaf_blocks"]
