"""The chunked causal-LM loss: transformers' loss and gradients, without ever the full logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from test_data_collate import make_samples
from transformers.loss.loss_utils import ForCausalLMLoss

from tokenpacker_llava.data.collate import PackedCollator, PaddedCollator
from tokenpacker_llava.models.loss import chunked_causal_lm_loss, chunked_loss_unsupported

VOCAB, HIDDEN = 50, 16


def head_and_inputs(seed: int = 0, length: int = 23) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(2, length, HIDDEN, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, length))
    labels[0, :9] = -100  # a masked prompt
    labels[1, 5:12] = -100  # and a masked run inside
    return head, hidden, labels


def loss_and_grads(loss: torch.Tensor, head: torch.nn.Linear, hidden: torch.Tensor):
    grads = torch.autograd.grad(loss, (hidden, head.weight))
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("num_items", [None, 37])
def test_matches_transformers_loss_and_gradients(chunk_size: int, num_items: int | None) -> None:
    head, hidden, labels = head_and_inputs()
    expected = loss_and_grads(
        ForCausalLMLoss(head(hidden), labels, VOCAB, num_items_in_batch=num_items), head, hidden
    )
    actual = loss_and_grads(
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size, num_items_in_batch=num_items),
        head,
        hidden,
    )
    torch.testing.assert_close(actual[0], expected[0])
    for got, want in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_matches_transformers_loss() -> None:
    # In bf16 both round the head's output and the logits' gradient to bf16 the same way; the
    # chunked loss sums the head's gradient over chunks in fp32.
    head, hidden, labels = head_and_inputs(length=300)
    head, hidden = head.bfloat16(), hidden.detach().bfloat16().requires_grad_()
    expected = loss_and_grads(ForCausalLMLoss(head(hidden), labels, VOCAB), head, hidden)
    actual = loss_and_grads(chunked_causal_lm_loss(hidden, head, labels, chunk_size=64), head, hidden)
    assert actual[1][0].dtype == actual[1][1].dtype == torch.bfloat16
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-3, atol=1e-3)
    for got, want in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4)


def test_the_full_logits_are_never_kept_for_backward() -> None:
    head, hidden, labels = head_and_inputs(length=200)
    targets = int((labels[:, 1:] != -100).sum())
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=16).backward()
    assert targets > 300
    # Only each chunk's inputs are kept: no tensor with a vocabulary-wide last dimension.
    assert saved and all(shape[-1] != VOCAB for shape in saved)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ForCausalLMLoss(head(hidden), labels, VOCAB).backward()
    assert any(shape.numel() >= 2 * 200 * VOCAB for shape in saved)  # the reference keeps them all


def test_a_frozen_head_gets_no_gradient() -> None:
    # Stage 1: the LLM (head included) is frozen; only the hidden states need a gradient.
    head, hidden, labels = head_and_inputs()
    expected = torch.autograd.grad(ForCausalLMLoss(head(hidden), labels, VOCAB), hidden)[0]
    head.weight.requires_grad_(False)
    chunked_causal_lm_loss(hidden, head, labels, chunk_size=4).backward()
    torch.testing.assert_close(hidden.grad, expected)
    assert head.weight.grad is None


def test_no_targets() -> None:
    head, hidden, labels = head_and_inputs()
    labels.fill_(-100)
    assert torch.isnan(chunked_causal_lm_loss(hidden, head, labels, chunk_size=4))  # as transformers' mean
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=4, num_items_in_batch=5)
    loss.backward()
    assert loss.item() == 0.0
    assert head.weight.grad is not None and hidden.grad is not None  # still part of the step
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=0)


def test_llms_whose_loss_is_more_than_cross_entropy_of_the_head_are_refused() -> None:
    assert chunked_loss_unsupported(SimpleNamespace(model_type="llama")) is None
    plain_moe = SimpleNamespace(model_type="mixtral", output_router_logits=False)
    assert chunked_loss_unsupported(plain_moe) is None
    for setting, value in (
        ("final_logit_softcapping", 30.0),
        ("logit_scale", 0.0625),
        ("logits_scaling", 8.0),  # Granite
        ("lm_head_multiplier", 2),  # Falcon-H1
        ("output_router_logits", True),
    ):
        reason = chunked_loss_unsupported(SimpleNamespace(model_type="x", **{setting: value}))
        assert reason is not None and setting in reason
    for setting, value in (("logit_scale", 1), ("logits_scaling", 1.0), ("lm_head_multiplier", 1)):
        assert chunked_loss_unsupported(SimpleNamespace(model_type="x", **{setting: value})) is None
    granite = tiny_model(text="granite")
    granite.config.text_config.logits_scaling = 8.0
    with pytest.raises(ValueError, match="granite has logits_scaling=8.0"):
        granite.use_chunked_loss(8)
    model = tiny_model()
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        model.use_chunked_loss(8)
    with pytest.raises(ValueError, match="must be positive"):
        tiny_model().use_chunked_loss(0)
    model = tiny_model()
    model.language_model.lm_head = torch.nn.Sequential(model.language_model.lm_head)
    with pytest.raises(ValueError, match="the LM head is a Sequential, not a plain nn.Linear"):
        model.use_chunked_loss(8)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_model_trains_with_the_same_loss_and_gradients(layout: str) -> None:
    reference, chunked = tiny_model().train(), tiny_model().train()
    chunked.use_chunked_loss(7)
    samples = make_samples(reference.num_image_tokens)
    batch = PaddedCollator(0)(samples) if layout == "padded" else PackedCollator()(samples)
    num_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + 3)
    results = []
    for model in (reference, chunked):
        out = model(**batch, num_items_in_batch=num_items)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (ref_out, ref_grads), (out, grads) = results
    assert out.logits is None and ref_out.logits is not None
    torch.testing.assert_close(out.loss, ref_out.loss)
    assert grads.keys() == ref_grads.keys() and any("projector" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
    with pytest.raises(ValueError, match="shift_labels are not supported"):
        chunked(**batch, shift_labels=batch["labels"])
    # Evaluation forwards keep returning logits, unless only the loss is asked for.
    chunked.eval()
    with torch.no_grad():
        full, expected = chunked(**batch), reference.eval()(**batch)
        torch.testing.assert_close(full.logits, expected.logits)
        torch.testing.assert_close(full.loss, expected.loss)
        loss_only = chunked(**batch, loss_only=True)
        assert loss_only.logits is None
        torch.testing.assert_close(loss_only.loss, expected.loss)
        # Without a chunk size, loss_only changes nothing.
        torch.testing.assert_close(reference(**batch, loss_only=True).logits, expected.logits)
