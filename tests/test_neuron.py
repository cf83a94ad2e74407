"""The LIF neuron equals SpikingJelly's LIFNode as the reference configures it: values and surrogate
gradients against a plain per-step autograd loop, hand-worked examples, no state between calls."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikeprune.neuron import LIF, lif_multistep, lif_reference_loop
from spikeprune.surrogate import heaviside_sigmoid, sigmoid_grad




def _drive(T, shape=(6, 41), seed=0):
    """Input currents that cross the threshold often: mean 0.9, spread 1.5 (float64)."""
    g = torch.Generator().manual_seed(seed)
    return (0.9 + 1.5 * torch.randn(T, *shape, generator=g, dtype=torch.float64))


def _values_and_grads(fn, x, upstream, **kw):
    x = x.clone().requires_grad_(True)
    s = fn(x, **kw)
    (s * upstream).sum().backward()
    return s.detach(), x.grad


@pytest.mark.parametrize("T", [1, 2, 4, 7])
@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
def test_matches_reference_loop_values_and_gradients(T, v_threshold):
    x = _drive(T, seed=T)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    s_ours, g_ours = _values_and_grads(lif_multistep, x, upstream, v_threshold=v_threshold)
    s_ref, g_ref = _values_and_grads(lif_reference_loop, x, upstream, v_threshold=v_threshold)

    rate = s_ref.mean().item()
    assert 0.15 < rate < 0.85, f"test input should cross the threshold often, rate {rate}"
    if T >= 4:  # some neurons fire, reset, and fire again: the reset path is exercised
        assert (s_ref.sum(0) >= 2).any()
    assert torch.equal(s_ours, s_ref)
    assert s_ours.dtype == torch.float64 and set(s_ours.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)
    assert g_ref.abs().sum() > 0


def test_module_uses_its_constants():
    x = _drive(4)
    up = torch.randn_like(x)
    lif = LIF(tau=3.0, v_threshold=0.7, alpha=2.5)
    s_ours, g_ours = _values_and_grads(lif, x, up)
    s_ref, g_ref = _values_and_grads(lif_reference_loop, x, up, tau=3.0, v_threshold=0.7, alpha=2.5)
    assert torch.equal(s_ours, s_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)


def test_hand_worked_example():
    # tau 2, threshold 1, hard reset to 0:
    #   t0: h = 0 + (1.5 - 0)/2 = 0.75        no spike, v = 0.75
    #   t1: h = 0.75 + (0.5 - 0.75)/2 = 0.625 no spike, v = 0.625
    #   t2: h = 0.625 + (2.5 - 0.625)/2 = 1.5625  spike, v = 0
    #   t3: h = 0 + (2.0 - 0)/2 = 1.0         h == threshold fires (Heaviside(0) = 1), v = 0
    #   t4: h = 0 + (0.4 - 0)/2 = 0.2         no spike
    x = torch.tensor([1.5, 0.5, 2.5, 2.0, 0.4], dtype=torch.float64).view(5, 1)
    expected = torch.tensor([0, 0, 1, 1, 0], dtype=torch.float64).view(5, 1)
    assert torch.equal(lif_multistep(x), expected)
    assert torch.equal(lif_reference_loop(x), expected)
    # attention threshold 0.5: t0 h = 0.75 fires already
    assert lif_multistep(x, v_threshold=0.5)[0].item() == 1.0


def test_hand_worked_gradient_two_steps():
    # T = 2, one neuron, upstream gradient only on the last spike.
    #   h0 = x0/2, h1 = v0 + (x1 - v0)/2 with v0 = h0 (no spike at t0), so dh1/dx0 = (1/2)(1 - 1/2)
    #   ds1/dh1 = sigmoid'(h1 - 1) = alpha sg (1 - sg)
    x = torch.tensor([[0.6], [0.9]], dtype=torch.float64, requires_grad=True)
    lif_multistep(x)[1].sum().backward()
    h1 = 0.3 + (0.9 - 0.3) / 2
    sg = 1 / (1 + math.exp(-4.0 * (h1 - 1.0)))
    d = 4.0 * sg * (1 - sg)
    assert x.grad[1].item() == pytest.approx(d / 2, rel=1e-12)
    assert x.grad[0].item() == pytest.approx(d * 0.5 * 0.5, rel=1e-12)


def test_reset_is_detached():
    # After a spike the membrane is zero whatever h was; with detach_reset the gradient still flows
    # through h * (1 - s) as if s were a constant: d v / d h = 1 - s = 0 after a spike.
    x = torch.tensor([[4.0], [0.8]], dtype=torch.float64, requires_grad=True)
    s = lif_multistep(x)
    assert s[:, 0].tolist() == [1.0, 0.0]
    s[1].sum().backward()
    assert x.grad[0].item() == 0.0  # the only path from x0 to s1 runs through the reset membrane


def test_no_state_between_calls():
    lif = LIF()
    x = _drive(4, seed=3)
    first = lif(x)
    lif(_drive(4, shape=(2, 5), seed=4) + 5.0)  # a different batch in between, firing a lot
    assert torch.equal(lif(x), first)
    assert not list(lif.buffers()) and not list(lif.parameters())


def test_record_rate_and_no_grad_path():
    lif = LIF()
    x = _drive(3, seed=5)
    with torch.no_grad():
        s = lif(x)
    assert lif.last_rate is None  # off unless measuring
    lif.record_rate = True
    s2 = lif(x)
    assert torch.equal(s, s2)
    assert lif.last_rate.item() == pytest.approx(s.mean().item())


def test_float32_and_broadcast_views():
    # The stem feeds an expanded (stride-0) view of one step repeated T times.
    step = torch.randn(3, 8, generator=torch.Generator().manual_seed(6)) + 0.9
    expanded = step.unsqueeze(0).expand(4, 3, 8)
    s = lif_multistep(expanded)
    assert s.dtype == torch.float32
    assert torch.equal(s, lif_reference_loop(expanded.contiguous()))


def test_surrogate_gradient_formula():
    u = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    spikes = heaviside_sigmoid(u, 4.0)
    assert torch.equal(spikes, (u >= 0).double())  # Heaviside(0) = 1, as SpikingJelly
    spikes.sum().backward()
    # d/du sigmoid(alpha u) by autograd on the smooth function
    v = u.detach().clone().requires_grad_(True)
    torch.sigmoid(4.0 * v).sum().backward()
    torch.testing.assert_close(u.grad, v.grad, rtol=1e-12, atol=0)
    # and the closed form alpha * sg * (1 - sg); peak alpha / 4 at u = 0
    sg = torch.sigmoid(4.0 * u.detach())
    torch.testing.assert_close(sigmoid_grad(u.detach(), 4.0), 4.0 * sg * (1 - sg), rtol=1e-12, atol=0)
    assert sigmoid_grad(torch.zeros(1, dtype=torch.float64), 4.0).item() == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 6), n=st.integers(1, 20), tau=st.floats(1.2, 5.0), vth=st.floats(0.2, 1.5),
       alpha=st.floats(0.5, 8.0), seed=st.integers(0, 2**16))
def test_property_matches_reference(T, n, tau, vth, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    x = vth + 1.5 * torch.randn(T, n, generator=g, dtype=torch.float64)
    up = torch.randn(T, n, generator=g, dtype=torch.float64)
    s1, g1 = _values_and_grads(lif_multistep, x, up, tau=tau, v_threshold=vth, alpha=alpha)
    s2, g2 = _values_and_grads(lif_reference_loop, x, up, tau=tau, v_threshold=vth, alpha=alpha)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(g1, g2, rtol=1e-11, atol=1e-13)


def test_matches_spikingjelly_when_installed():
    try:
        from spikingjelly.activation_based import neuron as sj_neuron, surrogate as sj_surrogate
    except Exception as e:  # ImportError, or a torchvision that fails to load beside CPU torch
        pytest.skip("spikingjelly is not importable here (" + type(e).__name__ + "): `make install` installs "
                    "SpikingJelly 2.0 with --no-deps (its declared dependencies would pull a CUDA torch); "
                    "our LIF is still checked against a plain transcription of its update rule.")
    x = _drive(4, seed=7).float()
    up = torch.randn_like(x)
    for vth in (1.0, 0.5):
        node = sj_neuron.LIFNode(tau=2.0, decay_input=True, v_threshold=vth, v_reset=0.0, detach_reset=True,
                                 surrogate_function=sj_surrogate.Sigmoid(alpha=4.0), step_mode="m")
        s_sj, g_sj = _values_and_grads(node, x, up)
        s_ours, g_ours = _values_and_grads(lif_multistep, x, up, v_threshold=vth)
        assert torch.equal(s_ours, s_sj)
        torch.testing.assert_close(g_ours, g_sj, rtol=1e-5, atol=1e-6)
