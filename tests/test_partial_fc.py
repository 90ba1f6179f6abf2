"""Partial FC: equivalence with the plain headers in one process, sampling, 2 gloo ranks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from femb.headers import PartialFCHeader, available_headers, build_header
from femb.headers.partial_fc import _init_rows, shard_range

D, C = 8, 7

# (margin name, its keyword arguments); embeddings are scaled into MagFace's [l_a, u_a] range.
MARGINS = [
    ("arcface", {"s": 16.0, "m": 0.5}),
    ("cosface", {"s": 16.0, "m": 0.35}),
    ("combined", {"s": 16.0, "m1": 1.0, "m2": 0.3, "m3": 0.1}),
    ("sphereface", {"form": "original", "m": 4.0}),
    ("magface", {"s": 16.0}),
    ("adaface", {"s": 16.0}),
    ("curricularface", {"s": 16.0}),
]


def _data(batch: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, D, generator=generator) * 6.0 + 3.0).to(dtype)
    y = torch.randint(0, C, (batch,), generator=generator)
    weight = torch.randn(C, D, generator=generator).to(dtype)
    return x, y, weight


def _reference(name: str, kwargs: dict, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Plain header + CrossEntropyLoss on the full batch: (header, loss, x with grad)."""
    header = build_header(name, D, C, **kwargs).to(weight.dtype)
    with torch.no_grad():
        header.weight.copy_(weight)
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(header(x, y), y) + sum(header.extra_losses.values())
    loss.backward()
    return header, loss, x


def _partial(name: str, kwargs: dict, weight: torch.Tensor, x, y, **options):
    header = PartialFCHeader(D, C, margin=name, seed=0, **options, **kwargs).to(weight.dtype)
    header.load_full_weight(weight)
    x = x.clone().requires_grad_()
    loss = header(x, y) + sum(header.extra_losses.values())
    loss.backward()
    return header, loss, x


# --------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("name,kwargs", MARGINS, ids=[m[0] for m in MARGINS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_process_equals_header_plus_cross_entropy(name, kwargs, dtype):
    x, y, weight = _data(12, dtype)
    ref, ref_loss, ref_x = _reference(name, kwargs, weight, x, y)
    pfc, loss, px = _partial(name, kwargs, weight, x, y)

    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tol)
    torch.testing.assert_close(px.grad, ref_x.grad, **tol)
    torch.testing.assert_close(pfc.weight.grad, ref.weight.grad, **tol)
    # Margin state (AdaFace norm EMAs, CurricularFace t) evolves as in the plain header.
    for key, value in ref.state_dict().items():
        if key != "weight":
            torch.testing.assert_close(pfc.margin.state_dict()[key], value)
    assert set(ref.extra_losses) == set(pfc.extra_losses)
    assert pfc.stats()["partial_fc/cos_target_mean"] == pytest.approx(
        ref.stats()[f"{ref.stats_prefix}/cos_target_mean"], rel=1e-5
    )


def test_without_labels_gives_margin_free_logits():
    x, y, weight = _data(5)
    ref = build_header("arcface", D, C)
    with torch.no_grad():
        ref.weight.copy_(weight)
    pfc = PartialFCHeader(D, C, margin="arcface")
    pfc.load_full_weight(weight)
    torch.testing.assert_close(pfc(x), ref(x))
    assert pfc.returns_loss and not hasattr(ref, "returns_loss")
    assert "partial_fc" not in available_headers()  # returns a loss: not a drop-in header


def test_sampling_keeps_positives_and_is_a_restricted_softmax():
    num_classes = 50
    generator = torch.Generator().manual_seed(1)
    # float64: s = 64 and centres of norm ~0.03 make float32 weight gradients differ in the
    # 5th digit between any two matmul shapes; in float64 the comparison is tight.
    x = torch.randn(6, D, generator=generator, dtype=torch.float64) * 5
    y = torch.tensor([3, 3, 17, 40, 41, 17])
    header = PartialFCHeader(D, num_classes, margin="arcface", sample_rate=0.2, seed=3).double()
    header.on_train_step(5)
    xp = x.clone().requires_grad_()
    loss = header(xp, y)
    loss.backward()
    sampled = header.sampled_classes
    assert len(sampled) == 10 and set(y.tolist()) <= set(sampled.tolist())
    assert torch.equal(sampled, sampled.sort().values)
    assert torch.isfinite(loss)

    # Independent reference: the full ArcFace logits restricted to the sampled columns.
    ref = build_header("arcface", D, num_classes).double()
    with torch.no_grad():
        ref.weight.copy_(header.weight)
    xr = x.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref(xr, y)[:, sampled], torch.searchsorted(sampled, y))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(xp.grad, xr.grad)
    torch.testing.assert_close(header.weight.grad, ref.weight.grad)
    unsampled = torch.ones(num_classes, dtype=torch.bool)
    unsampled[sampled] = False
    assert header.weight.grad[unsampled].abs().max() == 0

    # The draw depends on (seed, step, rank) only; evaluation mode uses every class.
    header.on_train_step(5)
    header(x, y)
    assert torch.equal(header.sampled_classes, sampled)
    header.on_train_step(6)
    header(x, y)
    assert not torch.equal(header.sampled_classes, sampled)
    header.eval()
    full = F.cross_entropy(ref(x, y), y)
    torch.testing.assert_close(header(x, y), full)
    assert header.sampled_classes is None


def test_more_positives_than_samples_keeps_exactly_the_positives():
    header = PartialFCHeader(D, 20, sample_rate=0.1, seed=0)  # int(0.1 * 20) = 2 samples
    y = torch.tensor([1, 5, 9, 9])
    assert torch.isfinite(header(torch.randn(4, D), y))
    assert header.sampled_classes.tolist() == [1, 5, 9]


def test_initial_centres_do_not_depend_on_the_sharding():
    full = _init_rows(0, 10_000, 4, seed=7)
    start, count = shard_range(10_000, 1, 3)
    assert (start, count) == (3334, 3333)
    torch.testing.assert_close(_init_rows(start, count, 4, seed=7), full[start : start + count])
    assert abs(float(full.std()) - 0.01) < 5e-4
    assert [shard_range(7, r, 2) for r in range(2)] == [(0, 4), (4, 3)]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PartialFCHeader(D, C, sample_rate=0.0)
    with pytest.raises(ValueError, match=r"margin='linear' is not a margin header.*'arcface'"):
        PartialFCHeader(D, C, margin="linear")
    with pytest.raises(NotImplementedError, match="sub-centre"):
        PartialFCHeader(D, C, margin="subcenter_arcface")
    with pytest.raises(ValueError, match="configure it directly"):
        PartialFCHeader(D, C, margin=build_header("cosface", D, 1), s=30.0)
    with pytest.raises(ValueError, match="not initialised"):
        PartialFCHeader(D, C, process_group=object())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        PartialFCHeader(D, C)(torch.randn(2, D), torch.tensor([0, 7]))
    header = PartialFCHeader(D, C, margin=build_header("cosface", D, 1))
    assert "weight" not in dict(header.margin.named_parameters())
    assert [name for name, _ in header.named_parameters()] == ["weight"]


# --------------------------------------------------------------------------------------------
# two ranks (gloo on the loopback interface)

DIST_CASES = [
    ("arcface", {"s": 16.0, "m": 0.5}, 1.0),
    ("magface", {"s": 16.0}, 1.0),
    ("adaface", {"s": 16.0}, 1.0),
    ("curricularface", {"s": 16.0}, 1.0),
    ("sphereface", {"form": "original", "m": 4.0}, 1.0),
    ("arcface", {"s": 16.0, "m": 0.5}, 0.5),
]
# Unequal local batches (3 + 5) exercise the padded all-gather.
SPLIT = (3, 5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y, weight = _data(sum(SPLIT))
        lo = sum(SPLIT[:rank])
        local = slice(lo, lo + SPLIT[rank])
        for case, (name, kwargs, rate) in enumerate(DIST_CASES):
            header = PartialFCHeader(D, C, margin=name, sample_rate=rate, seed=0, **kwargs)
            header.load_full_weight(weight)
            header.on_train_step(0)
            xr = x[local].clone().requires_grad_()
            loss = header(xr, y[local]) + sum(header.extra_losses.values())
            loss.backward()
            torch.save(
                {
                    "loss": loss.detach(),
                    "x_grad": xr.grad,
                    "w_grad": header.weight.grad,
                    "class_start": header.class_start,
                    "num_local": header.num_local,
                    "sampled": header.sampled_classes,
                    "margin_state": header.margin.state_dict(),
                    "gathered": header.gather_weight(),
                },
                Path(out) / f"rank{rank}_case{case}.pt",
            )
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_full_header(tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2)
    x, y, weight = _data(sum(SPLIT))
    for case, (name, kwargs, rate) in enumerate(DIST_CASES):
        ranks = [torch.load(tmp_path / f"rank{r}_case{case}.pt") for r in range(2)]
        assert [(r["class_start"], r["num_local"]) for r in ranks] == [(0, 4), (4, 3)]
        for result in ranks:
            torch.testing.assert_close(result["gathered"], weight)

        if rate < 1.0:
            # Each rank keeps its positives of the global batch and samples the rest.
            sampled = torch.cat([r["sampled"] for r in ranks])
            for result in ranks:
                lo, n = result["class_start"], result["num_local"]
                mine = {c for c in y.tolist() if lo <= c < lo + n}
                assert mine <= set(result["sampled"].tolist())
                assert len(result["sampled"]) == max(len(mine), int(rate * n))
            header = build_header(name, D, C, **kwargs)
            with torch.no_grad():
                header.weight.copy_(weight)
            xr = x.clone().requires_grad_()
            ref_loss = F.cross_entropy(header(xr, y)[:, sampled], torch.searchsorted(sampled, y))
            ref_loss.backward()
            ref_x = xr
        else:
            header, ref_loss, ref_x = _reference(name, kwargs, weight, x, y)

        tol = {"rtol": 1e-5, "atol": 1e-5}
        for result in ranks:
            torch.testing.assert_close(result["loss"], ref_loss.detach(), **tol)  # same on both
        w_grad = torch.cat([r["w_grad"] for r in ranks])
        torch.testing.assert_close(w_grad, header.weight.grad, **tol)
        # Local embeddings get world_size x their gradient: DDP's averaging divides it back.
        x_grad = torch.cat([r["x_grad"] for r in ranks]) / 2
        torch.testing.assert_close(x_grad, ref_x.grad, **tol)
        for key, value in header.state_dict().items():
            if key != "weight":
                for result in ranks:
                    torch.testing.assert_close(result["margin_state"][key], value, **tol)
