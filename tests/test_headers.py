"""Tests of femb.headers: reference logits at known angles, gradients, numerics, training.

Reference values are computed by hand (``math`` on the chosen angles), not by femb code. Class
weights are placed on the unit circle at known angles so that cos(theta_j) is exact.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from femb.headers import (
    AdaFaceHeader,
    ArcFaceHeader,
    CombinedMarginHeader,
    CosFaceHeader,
    CurricularFaceHeader,
    Header,
    LinearHeader,
    MagFaceHeader,
    SphereFaceHeader,
    SubCenterArcFaceHeader,
    available_headers,
    build_header,
)
from femb.headers.magface import magface_lambda_g_bound
from femb.headers.sphereface import chebyshev_cos, sphereface_psi

REPO = Path(__file__).resolve().parents[1]

# Every header in a representative set of configurations (default first).
VARIANTS: dict[str, tuple[type[Header], dict]] = {
    "linear": (LinearHeader, {}),
    "linear_nobias": (LinearHeader, {"bias": False}),
    "sphereface": (SphereFaceHeader, {}),
    "sphereface_exact": (SphereFaceHeader, {"detach": False}),
    "sphereface_original": (SphereFaceHeader, {"form": "original"}),
    "cosface": (CosFaceHeader, {}),
    "arcface": (ArcFaceHeader, {}),
    "arcface_easy": (ArcFaceHeader, {"easy_margin": True}),
    "arcface_detach": (ArcFaceHeader, {"detach_margin": True}),
    "combined": (CombinedMarginHeader, {"m1": 1.2, "m2": 0.3, "m3": 0.1}),
    "magface": (MagFaceHeader, {}),
    "magface_hard": (MagFaceHeader, {"easy_margin": False}),
    "adaface": (AdaFaceHeader, {}),
    "curricularface": (CurricularFaceHeader, {}),
    "subcenter_arcface": (SubCenterArcFaceHeader, {}),
}


def make(name: str, in_features: int, out_features: int, **extra) -> Header:
    cls, kwargs = VARIANTS[name]
    return cls(in_features, out_features, **{**kwargs, **extra})


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def circle_header(header: Header, class_angles: list[float]) -> Header:
    """Put the class weights (C, 2) at the given angles (radii 2, 3, ... to test normalisation)."""
    rows = [[(2 + j) * v for v in unit(a)] for j, a in enumerate(class_angles)]
    with torch.no_grad():
        header.weight.copy_(torch.tensor(rows))
    return header


def embed(angles: list[float], norms: list[float] | float = 1.0) -> torch.Tensor:
    """2-D embeddings (B, 2) at the given angles and norms."""
    norms = [norms] * len(angles) if isinstance(norms, float | int) else norms
    return torch.tensor([[r * v for v in unit(a)] for a, r in zip(angles, norms, strict=True)])


# Three classes at 0, pi/2 and pi (cos between them exact up to rounding).
CLASS_ANGLES = [0.0, math.pi / 2, math.pi]


def logits_at(header: Header, thetas: list[float], norms=1.0, label: int = 0) -> torch.Tensor:
    """Logits for samples at angle theta from class ``label`` (0 at angle 0)."""
    circle_header(header, CLASS_ANGLES)
    x = embed(thetas, norms)
    y = torch.full((len(thetas),), label, dtype=torch.long)
    return header(x, y).detach().double()


def expected_others(s: float, thetas: list[float]) -> torch.Tensor:
    """Non-target logits (classes 1, 2) of samples at angle theta from class 0: s cos(.)."""
    return torch.tensor(
        [[s * math.cos(t - math.pi / 2), s * math.cos(t - math.pi)] for t in thetas],
        dtype=torch.float64,
    )


def check(out: torch.Tensor, target: list[float], others: torch.Tensor) -> None:
    torch.testing.assert_close(
        out[:, 0], torch.tensor(target, dtype=torch.float64), atol=2e-4, rtol=1e-5
    )
    torch.testing.assert_close(out[:, 1:], others, atol=2e-4, rtol=1e-5)


# ---------------------------------------------------------------------- reference logits


def test_cosface_reference() -> None:
    thetas = [0.3, 1.2, 2.8]
    out = logits_at(CosFaceHeader(2, 3, s=64.0, m=0.35), thetas)
    check(out, [64 * (math.cos(t) - 0.35) for t in thetas], expected_others(64, thetas))


def test_arcface_reference_default_rule() -> None:
    s, m = 64.0, 0.5
    thetas = [0.3, 1.2, 2.5, 2.9]  # pi - m = 2.64: the last one is past it
    out = logits_at(ArcFaceHeader(2, 3, s=s, m=m), thetas)
    target = [s * math.cos(t + m) for t in thetas[:3]]
    target.append(s * (math.cos(2.9) - m * math.sin(m)))
    check(out, target, expected_others(s, thetas))


def test_arcface_reference_easy_margin() -> None:
    s, m = 64.0, 0.5
    thetas = [0.3, 1.2, 1.8, 2.9]  # margin only where cos > 0, i.e. theta < pi / 2
    out = logits_at(ArcFaceHeader(2, 3, s=s, m=m, easy_margin=True), thetas)
    target = [s * math.cos(0.3 + m), s * math.cos(1.2 + m), s * math.cos(1.8), s * math.cos(2.9)]
    check(out, target, expected_others(s, thetas))


def test_arcface_target_logit_monotonicity() -> None:
    """Default rule: decreasing on [0, pi]; easy margin: decreasing but for a jump at pi / 2."""
    s, m = 64.0, 0.5
    thetas = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    out = logits_at(ArcFaceHeader(2, 3, s=s, m=m), thetas.tolist())[:, 0]
    assert (out[1:] - out[:-1] <= 1e-4).all()

    out = logits_at(ArcFaceHeader(2, 3, s=s, m=m, easy_margin=True), thetas.tolist())[:, 0]
    steps = out[1:] - out[:-1]
    jump = steps.argmax()
    assert abs(thetas[jump].item() - math.pi / 2) < 2e-3
    assert steps[jump].item() == pytest.approx(s * math.sin(m), abs=0.2)
    steps[jump] = 0
    assert (steps <= 1e-4).all()


def test_arcface_detach_margin_forward_and_gradient() -> None:
    """Straight-through: same values as ArcFace, gradient of the plain scaled cosine."""
    thetas = [0.3, 1.2, 2.9]
    exact = logits_at(ArcFaceHeader(2, 3), thetas)
    detached_header = circle_header(ArcFaceHeader(2, 3, detach_margin=True), CLASS_ANGLES)
    torch.testing.assert_close(logits_at(detached_header, thetas), exact)

    plain = circle_header(CosFaceHeader(2, 3, m=0.0), CLASS_ANGLES)
    y = torch.zeros(3, dtype=torch.long)
    grads = []
    for header in (detached_header, plain):
        x = embed(thetas, 2.0).requires_grad_()
        header(x, y)[:, 0].sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_combined_margin_reference_and_equivalences() -> None:
    thetas = [0.3, 0.9, 1.7, 2.5]  # theta + 0.5 < pi for all
    out = logits_at(CombinedMarginHeader(2, 3, s=32.0, m1=1.3, m2=0.2, m3=0.1), thetas)
    check(out, [32 * (math.cos(1.3 * t + 0.2) - 0.1) for t in thetas], expected_others(32, thetas))

    arc = logits_at(ArcFaceHeader(2, 3, s=64.0, m=0.5), thetas)
    as_arc = logits_at(CombinedMarginHeader(2, 3, s=64.0, m1=1.0, m2=0.5, m3=0.0), thetas)
    torch.testing.assert_close(as_arc, arc, atol=1e-4, rtol=1e-5)

    thetas = [0.3, 1.7, 2.9, 3.1]  # CosFace has no validity range
    cos = logits_at(CosFaceHeader(2, 3, s=64.0, m=0.35), thetas)
    as_cos = logits_at(CombinedMarginHeader(2, 3, s=64.0, m1=1.0, m2=0.0, m3=0.35), thetas)
    torch.testing.assert_close(as_cos, cos)


def test_sphereface_psi_pieces() -> None:
    """psi = (-1)^k cos(m theta) - 2k for k = 0, 1, 2 (m = 4: pieces of width pi / 4)."""
    cases = [(0.5, 0, math.cos(2.0)), (1.0, 1, -math.cos(4.0) - 2), (2.0, 2, math.cos(8.0) - 4)]
    for theta, k, expected in cases:
        assert math.floor(4 * theta / math.pi) == k
        got = sphereface_psi(torch.tensor([math.cos(theta)], dtype=torch.float64), 4.0)
        assert got.item() == pytest.approx(expected, abs=1e-9)
        # Non-integer m goes through acos instead of the Chebyshev polynomial.
        got = sphereface_psi(torch.tensor([math.cos(theta)], dtype=torch.float64), 2.5)
        k25 = math.floor(2.5 * theta / math.pi)
        assert got.item() == pytest.approx((-1) ** k25 * math.cos(2.5 * theta) - 2 * k25)

    c = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(chebyshev_cos(c, 5), torch.cos(5 * torch.acos(c)))
    # Monotonically decreasing in theta, continuous across the piece boundaries.
    thetas = torch.linspace(0, math.pi, 4001, dtype=torch.float64)
    psi = sphereface_psi(torch.cos(thetas), 4.0)
    steps = psi[1:] - psi[:-1]
    assert (steps <= 1e-12).all() and steps.abs().max() < 0.02


def test_sphereface_normalized_reference() -> None:
    s, m = 30.0, 1.7
    thetas = [1.0, 2.5]  # k = floor(1.7 theta / pi) = 0 and 1
    out = logits_at(SphereFaceHeader(2, 3), thetas)
    target = [s * math.cos(m * 1.0), s * (-math.cos(m * 2.5) - 2)]
    check(out, target, expected_others(s, thetas))


def test_sphereface_original_reference_and_lambda() -> None:
    header = SphereFaceHeader(2, 3, form="original")
    assert header.m == 4.0
    thetas, r = [0.5, 1.0, 2.0], 3.0
    psi = [math.cos(2.0), -math.cos(4.0) - 2, math.cos(8.0) - 4]
    for step, lam in [(0, 1000.0), (10**5, 5.0)]:
        header.on_train_step(step)
        assert header.stats()["sphereface/lambda"] == pytest.approx(lam)
        out = logits_at(header, thetas, norms=r)
        target = [
            r * (lam * math.cos(t) + p) / (1 + lam) for t, p in zip(thetas, psi, strict=True)
        ]
        check(out, target, expected_others(r, thetas))


def test_sphereface_lambda_schedule() -> None:
    header = SphereFaceHeader(2, 3, form="original")
    assert header.lambda_at(0) == pytest.approx(1000.0)
    assert header.lambda_at(100) == pytest.approx(1000.0 / (1 + 0.12 * 100))  # 76.92
    assert header.lambda_at(10**5) == pytest.approx(5.0)  # 0.083 floored at lambda_min
    header.on_train_step(100)
    assert header.lambda_ == pytest.approx(76.923, abs=1e-3)


def test_magface_reference_margin_clamped_below_inside_above() -> None:
    s = 64.0
    norms = [5.0, 60.0, 200.0]  # a = 10 (clamped), 60, 110 (clamped)
    margins = [0.45, 0.45 + 0.35 * 50 / 100, 0.8]
    thetas = [0.7, 0.7, 0.7]
    out = logits_at(MagFaceHeader(2, 3), thetas, norms=norms)
    check(out, [s * math.cos(0.7 + m) for m in margins], expected_others(s, thetas))

    # Easy margin (default): no margin for cos <= 0; hard rule: insightface fallback.
    out = logits_at(MagFaceHeader(2, 3), [2.0], norms=[200.0])
    assert out[0, 0].item() == pytest.approx(s * math.cos(2.0), abs=1e-4)
    out = logits_at(MagFaceHeader(2, 3, easy_margin=False), [2.0, 2.9], norms=[200.0, 200.0])
    assert out[0, 0].item() == pytest.approx(s * math.cos(2.8), abs=1e-4)
    assert out[1, 0].item() == pytest.approx(s * (math.cos(2.9) - 0.8 * math.sin(0.8)), abs=1e-4)


def test_magface_g_term_value_and_stats() -> None:
    header = circle_header(MagFaceHeader(2, 3), CLASS_ANGLES)
    x = embed([0.1, 0.2, 0.3], [5.0, 60.0, 200.0])
    header(x, torch.zeros(3, dtype=torch.long))
    a = [10.0, 60.0, 110.0]
    g = [1 / v + v / 110.0**2 for v in a]
    assert set(header.extra_losses) == {"magface_g"}
    assert header.extra_losses["magface_g"].item() == pytest.approx(35.0 * sum(g) / 3, rel=1e-6)
    stats = header.stats()
    assert stats["magface/m_min"] == pytest.approx(0.45)
    assert stats["magface/m_max"] == pytest.approx(0.8)
    assert stats["magface/m_mean"] == pytest.approx((0.45 + 0.625 + 0.8) / 3)
    assert stats["magface/norm_mean"] == pytest.approx(265 / 3, rel=1e-6)
    assert stats["magface/g_loss"] == pytest.approx(35.0 * sum(g) / 3, rel=1e-6)
    # The g term is in extra_losses only, never in the logits; labels=None clears it.
    header(x)
    assert header.extra_losses == {}


def test_magface_g_gradient_pushes_norm_towards_u_a() -> None:
    header = MagFaceHeader(2, 3)
    norms = [5.0, 30.0, 90.0, 200.0]
    x = embed([0.1, 0.2, 0.3, 0.4], norms).requires_grad_()
    header(x, torch.zeros(4, dtype=torch.long))
    header.extra_losses["magface_g"].backward()
    radial = (x.grad * x.detach()).sum(1) / torch.tensor(norms)  # d loss / d ||x||
    for a, r in zip(norms[1:3], radial[1:3].tolist(), strict=True):
        assert r < 0  # gradient descent increases the norm below u_a
        assert r == pytest.approx(35.0 / 4 * (-1 / a**2 + 1 / 110.0**2), rel=1e-4)
    assert radial[0] == 0 and radial[3] == 0  # clamped: no gradient, as in the official code


def test_magface_lambda_g_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert magface_lambda_g_bound(64.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(22.587, abs=1e-3)
    with caplog.at_level(logging.WARNING, logger="femb.headers.magface"):
        MagFaceHeader(8, 4)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="femb.headers.magface"):
        MagFaceHeader(8, 4, lambda_g=10.0)
    assert any(
        "lambda_g=10" in r.getMessage() and "22.59" in r.getMessage() for r in caplog.records
    )


def test_adaface_reference() -> None:
    s, m, h = 64.0, 0.4, 0.333
    header = AdaFaceHeader(2, 3).eval()  # eval: the EMAs stay at the values set here
    header.batch_mean.fill_(20.0)
    header.batch_std.fill_(10.0)
    norms = [20.0, 35.0, 100.0, 1.0]
    thetas = [1.0, 1.0, 0.2, 1.0]
    z = [0.0, h * 15 / 10.001, 1.0, h * (1.0 - 20) / 10.001]  # 100 -> clipped to 1
    target = []
    for t, zi in zip(thetas, z, strict=True):
        angle = min(max(t - m * zi, 1e-3), math.pi - 1e-3)  # 0.2 - 0.4 -> clipped to 1e-3
        target.append(s * (math.cos(angle) - m - m * zi))
    out = logits_at(header, thetas, norms=norms)
    check(out, target, expected_others(s, thetas))
    assert header.batch_mean.item() == 20.0 and header.batch_std.item() == 10.0


def test_adaface_ema_update_in_training_only() -> None:
    header = AdaFaceHeader(2, 3, t_alpha=0.5)
    x = embed([0.1, 0.2], [10.0, 30.0])
    y = torch.zeros(2, dtype=torch.long)
    header(x, y)
    assert header.batch_mean.item() == pytest.approx(0.5 * 20 + 0.5 * 20)
    assert header.batch_std.item() == pytest.approx(0.5 * 100 + 0.5 * math.sqrt(200), rel=1e-6)
    stats = header.stats()
    assert stats["adaface/norm_mean"] == pytest.approx(20.0)
    assert stats["adaface/norm_std"] == pytest.approx(math.sqrt(200), rel=1e-6)
    before = header.batch_std.item()
    header.eval()(x, y)
    header.train()(x)  # labels=None: no margin, no update
    header.train()(x[:1], y[:1])  # one sample: no std, std EMA unchanged
    assert header.batch_std.item() == pytest.approx(before)
    assert {"batch_mean", "batch_std"} <= set(header.state_dict())


def test_curricularface_reference() -> None:
    s, m, t = 64.0, 0.5, 0.3
    header = CurricularFaceHeader(2, 3).eval()
    header.t.fill_(t)
    # Classes at 0, 0.8 and 2.0 rad; sample at theta_y = 1.0 from class 0, at angle -1.0.
    circle_header(header, [0.0, 0.8, 2.0])
    out = header(embed([-1.0]), torch.tensor([0])).detach().double()[0]
    # theta_y = 1.0, target cos(1.5) = 0.07; negatives at 1.8 and 3.0 rad are easy (cos below).
    target, c1, c2 = math.cos(1.0 + m), math.cos(1.8), math.cos(3.0)
    assert max(c1, c2) < target
    expected = torch.tensor([s * target, s * c1, s * c2], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-5)
    # Sample at angle 0.5: theta_y = 0.5, target cos(1.0) = 0.54; class 1 at 0.3 rad (hard).
    out = header(embed([0.5]), torch.tensor([0])).detach().double()[0]
    c1, c2 = math.cos(0.3), math.cos(1.5)
    assert c1 > math.cos(1.0) > c2
    expected = [s * math.cos(1.0), s * c1 * (t + c1), s * c2]
    torch.testing.assert_close(
        out, torch.tensor(expected, dtype=torch.float64), atol=2e-4, rtol=1e-5
    )
    assert header.stats()["curricularface/hard_frac"] == pytest.approx(0.5)


def test_curricularface_t_update() -> None:
    header = circle_header(CurricularFaceHeader(2, 3, t_alpha=0.1), CLASS_ANGLES)
    header(embed([0.3, 1.1]), torch.zeros(2, dtype=torch.long))
    expected = 0.1 * (math.cos(0.3) + math.cos(1.1)) / 2
    assert header.t.item() == pytest.approx(expected, rel=1e-5)
    assert header.stats()["curricularface/t"] == pytest.approx(expected, rel=1e-5)
    header.eval()(embed([0.3]), torch.zeros(1, dtype=torch.long))
    assert header.t.item() == pytest.approx(expected, rel=1e-5)


def test_subcenter_arcface_reference() -> None:
    s, m = 64.0, 0.5
    header = SubCenterArcFaceHeader(2, 2, k=3)
    assert header.weight.shape == (6, 2)
    # Class 0: sub-centres at 0, 2.0, -2.5; class 1: at pi/2, 2.6, -1.0.
    angles = [0.0, 2.0, -2.5, math.pi / 2, 2.6, -1.0]
    with torch.no_grad():
        header.weight.copy_(torch.tensor([unit(a) for a in angles]))
    out = header(embed([1.8]), torch.tensor([0])).detach().double()[0]
    theta_y = 0.2  # nearest class-0 sub-centre at 2.0
    cos_1 = max(math.cos(1.8 - a) for a in angles[3:])  # nearest class-1 one at 2.6
    expected = torch.tensor([s * math.cos(theta_y + m), s * cos_1], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-5)


def test_linear_reference() -> None:
    header = LinearHeader(2, 3)
    with torch.no_grad():
        header.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]))
        header.fc.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    out = header(torch.tensor([[2.0, 1.0]]), torch.tensor([2]))
    torch.testing.assert_close(out, torch.tensor([[4.5, -1.0, 5.5]]))
    assert LinearHeader(2, 3, bias=False).fc.bias is None


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_labels_none_gives_margin_free_logits(name: str) -> None:
    torch.manual_seed(0)
    header = make(name, 8, 5).eval()
    x = torch.randn(6, 8) * 20
    out = header(x)
    if isinstance(header, LinearHeader):
        expected = header.fc(x)
    else:
        cos = F.normalize(x) @ F.normalize(header.weight).t()
        if header.num_subcenters > 1:
            cos = cos.view(6, 5, header.num_subcenters).amax(2)
        scale = (
            x.norm(dim=1, keepdim=True)
            if getattr(header, "form", "") == "original"
            else (header.s)
        )
        expected = scale * cos
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    assert header.extra_losses == {}


# ----------------------------------------------------------------------------- gradients


# Headers whose forward is a smooth function of (embeddings, weight) at generic points. Detached
# margins (straight-through) and AdaFace's detached norm statistics are deliberately not the
# derivative of the forward value, so gradcheck only applies to their weights (AdaFace) or is
# replaced by the straight-through test above.
GRADCHECK = [
    "linear",
    "sphereface_exact",
    "sphereface_original",
    "cosface",
    "arcface",
    "arcface_easy",
    "combined",
    "magface",
    "magface_hard",
    "curricularface",
    "subcenter_arcface",
]


@pytest.mark.parametrize("name", GRADCHECK + ["adaface"])
def test_gradcheck_float64(name: str) -> None:
    torch.manual_seed(0)
    header = make(name, 4, 3).double().eval()
    # Norms spread over MagFace's (l_a, u_a) = (10, 110), away from the clamp corners.
    x = torch.randn(5, 4, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(20, 90, 5, dtype=torch.float64)[:, None]
    y = torch.tensor([0, 1, 2, 1, 0])
    weight = header.weight.detach().clone().requires_grad_()
    key = "fc.weight" if isinstance(header, LinearHeader) else "weight"

    def fn(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = functional_call(header, {key: w}, (inp, y))
        return out + sum(header.extra_losses.values()) if header.extra_losses else out

    needs_x = name != "adaface"
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(needs_x), weight), atol=1e-5)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    header = make(name, 8, 5)
    x = (torch.randn(16, 8) * 10).requires_grad_()
    y = torch.arange(16) % 5
    loss = F.cross_entropy(header(x, y), y) + sum(header.extra_losses.values())
    loss.backward()
    for pname, p in header.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "mode",
    [
        "fp32",
        "bf16_input",
        "bf16_module",
        "fp16_input",
        "fp16_module",
        pytest.param("fp16_input_cuda", marks=[pytest.mark.gpu, NEEDS_CUDA]),
        pytest.param("fp16_autocast_cuda", marks=[pytest.mark.gpu, NEEDS_CUDA]),
    ],
)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_finite_at_cos_plus_minus_one(name: str, mode: str) -> None:
    """Embeddings equal to +-weight rows: cos(theta_y) = +-1 exactly; logits and grads finite.

    fp16 runs on the CPU here: float16 tensors follow IEEE binary16 on every device, so this
    checks the headers' handling of the dtype (promotion to float32 before the margin math,
    where s * cos and exp(s * cos) would overflow float16's 65504); the ``_cuda`` modes run
    the same check through the CUDA kernels, and under fp16 autocast, when a GPU is present."""
    torch.manual_seed(0)
    dim = 16  # >= 4 classes x 3 sub-centres, so that every target row is a basis vector
    header = make(name, dim, 4)
    k = getattr(header, "num_subcenters", 1)
    # Weights exactly representable in bfloat16, so that the cosines stay exactly +-1 there too.
    with torch.no_grad():
        header.weight.copy_(torch.randn_like(header.weight).to(torch.bfloat16).float())
        header.weight[: 4 * k].copy_(torch.eye(4 * k, dim) * 3)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    rows = header.weight.detach()[y * k]
    sign = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1])[:, None]
    rand_rows = torch.randn(8, dim).to(torch.bfloat16).float()
    x = torch.cat([sign * rows * 2.0, rand_rows])  # exact basis vectors + generic vectors
    y = torch.cat([y, torch.arange(8) % 4])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode[:4])
    device = "cuda" if mode.endswith("_cuda") else "cpu"
    header, x, y = header.to(device), x.to(device), y.to(device)
    if "_module" in mode:
        header = header.to(dtype)
    if "_input" in mode:
        x = x.to(dtype)
    x.requires_grad_()
    with torch.autocast(device, dtype=dtype or torch.float32, enabled="_autocast" in mode):
        out = header(x, y)
    assert out.dtype == torch.float32
    loss = F.cross_entropy(out, y) + sum(header.extra_losses.values())
    loss.backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad.float()).all()
    for p in header.parameters():
        assert torch.isfinite(p.grad.float()).all()
    if not name.startswith("linear"):
        assert all(math.isfinite(v) for v in header.stats().values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_logits_under_autocast(dtype: torch.dtype) -> None:
    header = ArcFaceHeader(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=dtype):
        out = header(x, torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, header(x, torch.tensor([0, 1, 2])))


# ------------------------------------------------------------------------------ training


def separable_problem(num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(num_classes)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, 8, generator=gen)) * 4
    y = torch.arange(64) % num_classes
    return centres[y] + 0.3 * torch.randn(64, 8, generator=gen), y


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_training_lowers_loss(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    x, y = separable_problem(num_classes)
    backbone = torch.nn.Linear(8, 8)
    header = make(name, 8, num_classes)
    params = [*backbone.parameters(), *header.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = []
    for step in range(60):
        header.on_train_step(step)
        optimizer.zero_grad()
        ce = F.cross_entropy(header(backbone(x), y), y)
        (ce + sum(header.extra_losses.values())).backward()
        optimizer.step()
        losses.append(ce.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    header.eval()
    assert (header(backbone(x)).argmax(1) == y).float().mean() == 1.0


# ---------------------------------------------------------------------- errors and registry


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"\['normalized', 'original'\]"):
        SphereFaceHeader(8, 4, form="a-softmax")
    with pytest.raises(ValueError, match="not used with form='original'"):
        SphereFaceHeader(8, 4, form="original", s=30.0)
    with pytest.raises(ValueError, match="degrees"):
        ArcFaceHeader(8, 4, m=28.6)
    with pytest.raises(ValueError, match="l_a < u_a"):
        MagFaceHeader(8, 4, l_a=110.0, u_a=10.0)
    with pytest.raises(ValueError, match="s must be"):
        CosFaceHeader(8, 4, s=0.0)
    with pytest.raises(TypeError, match="out_features must be an int"):
        CosFaceHeader(8, 4.0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        SphereFaceHeader(8, 4, m=0.5)


def test_invalid_inputs() -> None:
    header = ArcFaceHeader(8, 4)
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        header(torch.randn(3, 7), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        header(torch.randn(3, 8), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        header(torch.randn(3, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        header(torch.randn(3, 8), torch.tensor([0, 1, 4]))
    out = header(torch.randn(3, 8), torch.tensor([0, 1, 2], dtype=torch.int32))
    assert out.shape == (3, 4)


def test_registry() -> None:
    headers = available_headers()
    assert list(headers) == sorted(headers)
    assert {
        "arcface",
        "cosface",
        "sphereface",
        "magface",
        "linear",
        "adaface",
        "curricularface",
        "subcenter_arcface",
        "combined",
    } == set(headers)
    assert {cls for cls, _ in VARIANTS.values()} == set(headers.values())
    assert isinstance(build_header("cosface", 8, 4, m=0.2), CosFaceHeader)
    with pytest.raises(ValueError, match="choose one of"):
        build_header("normface", 8, 4)


# ------------------------------------------------------------------- independent reference


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # inside PML
@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface_original"])
def test_loss_matches_pytorch_metric_learning(name: str) -> None:
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    header = make(
        name,
        16,
        10,
        **({"lambda_base": 0.0, "lambda_min": 0.0} if name == "sphereface_original" else {}),
    )
    pml = {
        "arcface": lambda: losses.ArcFaceLoss(10, 16, margin=math.degrees(0.5), scale=64),
        "cosface": lambda: losses.CosFaceLoss(10, 16, margin=0.35, scale=64),
        "sphereface_original": lambda: losses.SphereFaceLoss(10, 16, margin=4, scale=1),
    }[name]()
    pml.W.data.copy_(header.weight.detach().t())
    x = torch.randn(32, 16) * 3
    y = torch.arange(32) % 10
    femb_loss = F.cross_entropy(header(x, y), y)
    assert femb_loss.item() == pytest.approx(pml(x, y).item(), rel=1e-5)


def test_benchmark_script_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("bench_headers", REPO / "benchmarks/headers.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    monkeypatch.setitem(sys.modules, "bench_headers", module)
    spec.loader.exec_module(module)
    args = [
        "--batch-size",
        "4",
        "--dim",
        "8",
        "--classes",
        "16",
        "--warmup",
        "1",
        "--reps",
        "1",
        "--no-pml",
    ]
    assert module.main(args) == 0
    table = capsys.readouterr().out
    assert "| 16 | ArcFace | femb |" in table and "MagFace" in table
