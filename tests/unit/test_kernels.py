"""The kernel choice for the calls CSA extends: the same attention as ComfyUI's SDPA backend, and
the host's own call wherever there is nothing faster to offer (a CPU, another backend, 'host')."""
import pytest
import torch

from harness.pack import load_pack

load_pack()
from consistent_story.attention import ConsistentAttentionError, KernelChoice  # noqa: E402
from consistent_story.attention.kernels import cudnn_first, sdpa  # noqa: E402


def reference(q, k, v, heads, mask=None):
    """Attention in float64, ComfyUI's [rows, tokens, heads * D] in and out."""
    rows = q.shape[0]
    qh, kh, vh = (t.double().reshape(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.double()[:, None]
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(rows, -1, q.shape[-1])


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("skip_reshape", [False, True])
def test_sdpa_is_comfyuis_attention_with_longer_keys_and_a_mask(skip_reshape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, tokens, 4 * 16, generator=g) for tokens in (10, 25, 25))
    mask = torch.randn(3, 10, 25, generator=g)
    expected = reference(q, k, v, 4, mask)
    inputs = [t.to(device()) for t in (q, k, v)]
    if skip_reshape:
        inputs = [t.reshape(3, -1, 4, 16).transpose(1, 2) for t in inputs]
    out = sdpa(*inputs, 4, mask.to(device()), skip_reshape=skip_reshape, backends=cudnn_first())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)


def test_the_host_call_runs_wherever_no_faster_kernel_applies():
    calls = []

    def attention_pytorch(*args, **kwargs):  # ComfyUI's SDPA backend, by name
        calls.append(args)
        return "host's"

    q = torch.randn(1, 4, 8)
    for choice, func in ((KernelChoice("host"), attention_pytorch), (KernelChoice(), lambda *a: "other backend")):
        assert choice.attend(func, lambda: func(q), q, q, q, 1, {}) in ("host's", "other backend")
        assert not choice.chosen
    if not q.is_cuda:
        assert KernelChoice().attend(attention_pytorch, lambda: attention_pytorch(q), q, q, q, 1, {}) == "host's"
    with pytest.raises(ConsistentAttentionError, match="attention_kernel must be one of"):
        KernelChoice("quickest")


def test_the_chosen_kernel_agrees_with_the_hosts():
    """On a CUDA GPU (CONSISTENT_STORY_TEST_DEVICE=gpu runs, docs/testing.md): the choice is
    measured once for the shape and its output is the host's within bf16 tolerance. On a CPU there
    is nothing to choose: the host's own result, nothing measured."""
    from torch.nn.attention import SDPBackend

    on_gpu = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(4, 24, tokens, 128, generator=g, device=dev, dtype=dtype) for tokens in (1152, 2688, 2688))
    host = sdpa(q, k, v, 24, skip_reshape=True, backends=[SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                           SDPBackend.MATH])

    def attention_pytorch(*args, **kwargs):
        return host

    choice = KernelChoice()
    out = choice.attend(attention_pytorch, lambda: host, q, k, v, 24, {"skip_reshape": True})
    assert len(choice.chosen) == (1 if on_gpu else 0)
    if on_gpu:
        torch.testing.assert_close(out.float(), host.float(), rtol=2e-2, atol=2e-2)
    else:
        assert out is host
