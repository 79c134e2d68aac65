"""The oneDNN float32 CPU linear (kernels/onednn_linear.py) against its reference F.linear: bias or
none, 1-D / 2-D / 3-D and strided x, empty batches, one and two threads; its refusals; the shape rule;
OneDNNLinear's shared parameters; and the probe's fallback when the op is missing or wrong."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kernels import onednn_linear as mod
from kernels.onednn_linear import OneDNNLinear, available, onednn_linear, onednn_linear_ref, prefers_onednn

ATOL = RTOL = 2e-5  # float32; oneDNN and MKL sum K products in different orders


@pytest.fixture
def onednn() -> None:
    if not available():
        pytest.skip("oneDNN linear is unavailable in this torch: the engine keeps F.linear (see the log)")


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """available()'s cached answer forgotten before and after a test that fakes the op."""
    available.cache_clear()
    yield
    available.cache_clear()


def _tensors(m: int, n: int, k: int, bias: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


@pytest.mark.usefixtures("onednn")
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("m,n,k", [(1, 1536, 576), (7, 640, 256), (16, 3072, 576), (48, 1000, 300),
                                   (3, 17, 33), (130, 512, 128)])  # fmt: skip
def test_matches_reference(m: int, n: int, k: int, bias: bool, threads: int) -> None:
    x, w, b = _tensors(m, n, k, bias, seed=m + n + k)
    out = onednn_linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, onednn_linear_ref(x, w, b), atol=ATOL, rtol=RTOL)


@pytest.mark.usefixtures("onednn")
def test_input_ranks_and_strides() -> None:
    x, w, b = _tensors(24, 600, 288, True, seed=1)
    cases = {
        "1-D": x[0],
        "3-D": x.reshape(2, 12, 288),
        "transposed": x.t().contiguous().t(),  # column-major rows
        "strided rows": torch.randn(24, 576)[:, ::2],  # last-dim stride 2
        "row slice": torch.randn(40, 288)[5:29],
        "empty": x[:0],
    }
    for name, xi in cases.items():
        out = onednn_linear(xi, w, b)
        assert out.shape == (*xi.shape[:-1], 600), name
        torch.testing.assert_close(out, onednn_linear_ref(xi, w, b), atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.usefixtures("onednn")
def test_refuses_what_it_does_not_take() -> None:
    x, w, b = _tensors(4, 64, 32, True, seed=2)
    with pytest.raises(ValueError, match="x must be"):
        onednn_linear(x[:, :16], w)
    with pytest.raises(ValueError, match="float32"):
        onednn_linear(x.bfloat16(), w)
    with pytest.raises(ValueError, match="weight dtype"):
        onednn_linear(x, w.double())
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        onednn_linear(x, w[0])
    with pytest.raises(ValueError, match="bias must be"):
        onednn_linear(x, w, b[:10])  # type: ignore[index]


def test_rule_takes_wide_projections_with_enough_inputs() -> None:
    # SmolLM2-135M: gate_up and the tied LM head; qkv (1.67 K), o, down stay with F.linear
    assert prefers_onednn(3072, 576) and prefers_onednn(49152, 576)
    assert not any(prefers_onednn(n, k) for n, k in [(960, 576), (576, 576), (576, 1536)])
    # Qwen2.5-0.5B, Llama-3.2-1B: gate_up and the head
    assert prefers_onednn(9728, 896) and prefers_onednn(151936, 896) and not prefers_onednn(1152, 896)
    assert prefers_onednn(16384, 2048) and prefers_onednn(128256, 2048) and not prefers_onednn(3072, 2048)
    # the edges: N >= 2K, K >= 512 and N * K >= 2^20; tiny layers never (oneDNN's fixed cost per call);
    # the demo models' 4096 x 256 head stays on MKL (it lost 4-15 % at M <= 16)
    assert prefers_onednn(4096, 512) and not prefers_onednn(4096, 511) and not prefers_onednn(8191, 4096)
    assert not prefers_onednn(4096, 256)
    assert prefers_onednn(2048, 512) and not prefers_onednn(2047, 512)  # 2^20 weights
    assert not prefers_onednn(1536, 576) and not prefers_onednn(768, 384) and not prefers_onednn(512, 256)
    assert not prefers_onednn(4096, 128) and not prefers_onednn(256, 64) and not prefers_onednn(128, 32)


@pytest.mark.usefixtures("onednn")
def test_module_shares_the_linear_parameters() -> None:
    lin = nn.Linear(300, 700, bias=True)
    new = OneDNNLinear.from_linear(lin)
    assert isinstance(new, nn.Linear) and new.weight is lin.weight and new.bias is lin.bias
    assert new.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(5, 300)
    with torch.inference_mode():
        torch.testing.assert_close(new(x), lin(x), atol=ATOL, rtol=RTOL)
    no_bias = OneDNNLinear.from_linear(nn.Linear(300, 700, bias=False))
    assert no_bias.bias is None


@pytest.mark.usefixtures("onednn")
def test_module_keeps_f_linear_below_min_rows() -> None:
    """A lone decode row (fewer than MIN_ROWS) runs MKL's F.linear, bit for bit; MIN_ROWS rows and
    more run oneDNN, bit for bit."""
    lin = nn.Linear(576, 3072, bias=False)
    new = OneDNNLinear.from_linear(lin)
    with torch.inference_mode():
        for rows in (1, mod.MIN_ROWS - 1, mod.MIN_ROWS, 48):
            x = torch.randn(rows, 576)
            want = torch.nn.functional.linear(x, lin.weight) if rows < mod.MIN_ROWS else mod.onednn_linear_unchecked(x, lin.weight)
            assert torch.equal(new(x), want), rows


@pytest.mark.usefixtures("fresh_probe")
def test_probe_falls_back_when_onednn_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert available() is False


@pytest.mark.usefixtures("fresh_probe")
def test_probe_falls_back_when_the_op_fails_or_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(mod, "onednn_linear_unchecked", broken)
    assert available() is False
    available.cache_clear()
    monkeypatch.setattr(mod, "onednn_linear_unchecked", lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0]))
    assert available() is False
