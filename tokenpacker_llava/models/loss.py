"""The causal-LM loss without the (tokens x vocabulary) logits: ``chunked_causal_lm_loss``.

A transformers causal LM computes the logits of every position, upcasts them to fp32 and keeps
them (and their gradient) for the backward pass: for a packed row of 16k tokens and a 32k
vocabulary that is 2 GiB of fp32 logits plus as much for their gradient, most of it for
positions that have no target at all (the image tokens and prompts LLaVA masks out). Here the
LM head runs only on the positions with a target, a chunk of them at a time, and each chunk's
gradients (for the hidden states and the head) are computed right away, in the forward pass,
so a chunk's logits live only while it is processed (the fused linear cross-entropy of Liger
Kernel or Cut Cross-Entropy, in plain PyTorch). The FLOPs are those of the usual forward and
backward of the head on those positions; nothing is recomputed.

Under DeepSpeed ZeRO-3 the head's weight is partitioned and gathered only around its module's
forward and backward, which never run here: ``register_with_zero3`` makes the module that
computes the loss gather it instead (once per forward and backward, so every rank makes the
same collective calls however many chunks its own batch needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# Text-config settings under which a causal LM's logits or loss are more than
# cross-entropy(lm_head(hidden)), with the values that leave them so: under any other value the
# chunked loss would silently compute something else.
_UNSUPPORTED_SETTINGS = {
    "final_logit_softcapping": ((None,), "its logits are soft-capped after the head"),
    "logit_scale": ((None, 1.0), "its logits are scaled after the head"),  # Cohere
    "logits_scaling": ((None, 1.0), "its logits are divided by it after the head"),  # Granite
    "lm_head_multiplier": ((None, 1.0), "its logits are multiplied by it after the head"),  # Falcon-H1
    "output_router_logits": ((None, False), "its loss adds the router's auxiliary loss"),
}


def _neutral(value, same) -> bool:
    if value is same:
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and isinstance(same, float) and value == same


def chunked_loss_unsupported(text_config) -> str | None:
    """Why the chunked loss cannot replace this LLM's own loss, or None when it can."""
    for name, (neutral, reason) in _UNSUPPORTED_SETTINGS.items():
        value = getattr(text_config, name, None)
        if not any(_neutral(value, same) for same in neutral):
            return f"{text_config.model_type} has {name}={value!r}: {reason}"
    return None


def supports_chunked_loss(head: nn.Module | None) -> str | None:
    """Why ``head`` cannot be used by the chunked loss (it is read as ``F.linear``), or None."""
    if type(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    if not head.weight.is_floating_point():
        return f"the LM head's weight is {head.weight.dtype} (quantized)"
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) / denominator, with the gradients computed
    chunk by chunk in the forward pass and only scaled by the incoming gradient in the backward.

    The division happens in fp32 before the logits' gradient is rounded to the weights' dtype
    (as autograd does it), so the usual incoming gradient (1, or a power-of-two loss scale)
    scales the rounded gradients exactly.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk_size: int, with_grads: bool):
        need_hidden, need_weight, need_bias = (with_grads and need for need in ctx.needs_input_grad[:3])
        # In the parameters' dtype, as autograd accumulates: addmm_ rounds once per chunk (the
        # product is summed into the buffer in fp32), and an fp32 buffer would cost as much
        # memory as the logits this function saves for a 7B model's head.
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_size):
            chunk, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(chunk, weight, bias).float()  # upcast before the softmax, as transformers
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                del logits
                continue
            # d CE / d logits = softmax - one_hot, computed in place of the logits.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits[torch.arange(len(chunk_targets), device=hidden.device), chunk_targets] -= 1.0
            # Rounded to the weights' dtype as autograd rounds it back through the .float() above.
            grad_logits = grad_logits.div_(denominator).to(hidden.dtype)
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), chunk)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
            # Free this chunk's logits before the next chunk allocates its own.
            del logits, grad_logits
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward ran twice (retain_graph is not supported)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # scaled in place and handed over: no second copy of the head's gradient
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_output).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def register_with_zero3(module: nn.Module, head: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, have ``module`` (whose forward computes the loss) gather the head's
    partitioned parameters for its forward and backward, as DeepSpeed does for any parameter a
    module uses outside its owner: the head's own forward, which would gather them, never runs."""
    partitioned = [parameter for parameter in head.parameters() if hasattr(parameter, "ds_id")]
    if partitioned:
        import deepspeed

        for parameter in partitioned:
            deepspeed.zero.register_external_parameter(module, parameter)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``head(hidden_states)`` against ``labels``, as transformers'
    ``ForCausalLMLoss`` computes it (position t predicts label t+1; ``-100`` is ignored; the sum
    over targets divided by ``num_items_in_batch`` when given, else the mean).

    ``hidden_states``: (batch, length, hidden); ``labels``: (batch, length); ``head``: a plain
    ``nn.Linear`` (``supports_chunked_loss``).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden_states.device)
    positions = (shifted != IGNORE_INDEX).nonzero().squeeze(-1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])[positions]
    reason = supports_chunked_loss(head)
    if reason is not None:
        raise ValueError(f"the chunked loss cannot use this head: {reason}")
    # With no targets the sum is 0 and every head parameter still gets a gradient, so it takes
    # part in the step (DDP, ZeRO); the mean over no targets is NaN, as transformers'.
    denominator = positions.numel() if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
    return _LinearCrossEntropy.apply(
        hidden, head.weight, head.bias, shifted[positions], denominator, chunk_size, torch.is_grad_enabled()
    )
