"""The replay's fast forms of shared frozen factors and of dead ops' shapes, the caller's buffer of reverse_jacobian,
and the retained heap."""

import pytest
import torch

from lllm.kernel import heap
from lllm.kernel.jacobian import reverse_jacobian
from lllm.kernel.mode import shared_frozen_factor, shared_probs_times_values, spread_last_axis
from lllm.kernel.opargs import broadcast_shape, concatenated_shape, metadata_signature, reduced_shape
from lllm.kernel.optable import F, L


@pytest.mark.parametrize("heads, kv_heads, queries", [(6, 6, 5), (6, 2, 5), (4, 1, 5), (6, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_probs_times_values_is_the_broadcast_product(heads, kv_heads, queries, dtype):
    gen = torch.Generator().manual_seed(heads + kv_heads)
    probs = torch.rand(1, heads, queries, 5, generator=gen, dtype=dtype).softmax(-1)  # (1, H, Wq, Wk)
    v = torch.randn(8, kv_heads, 5, 3, generator=gen, dtype=dtype)  # (B, KV, Wk, hd)
    assert shared_frozen_factor((probs, v), F)
    expected = probs @ v.repeat_interleave(heads // kv_heads, 1)
    got = shared_probs_times_values(probs[0], v)
    assert got.shape == expected.shape == (8, heads, queries, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)


def test_shared_frozen_factor_is_only_a_frozen_batch_one_left_operand():
    probs, v = torch.rand(1, 4, 5, 5), torch.randn(8, 2, 5, 3)
    assert not shared_frozen_factor((probs, v), L)  # a live left operand: the ordinary product
    assert not shared_frozen_factor((probs.expand(8, 4, 5, 5), v), F)  # one factor per batch row
    assert not shared_frozen_factor((probs, v[:1]), F)  # batch 1: nothing to share
    assert not shared_frozen_factor((probs, torch.randn(8, 3, 5, 3)), F)  # 3 key heads do not group 4
    assert not shared_frozen_factor((probs.double(), v), F)  # the ordinary product's dtype rules


def test_spread_last_axis_gives_the_same_products():
    inv, h = torch.rand(1, 5, 1), torch.randn(7, 5, 6)
    spread = spread_last_axis(inv, h)
    assert spread.shape == (1, 5, 6) and spread.is_contiguous()
    assert torch.equal(h * spread, h * inv) and torch.equal(spread * h, inv * h)
    assert spread_last_axis(torch.rand(7, 5, 1), torch.randn(1, 5, 6)).shape == (7, 5, 1)  # larger than h: kept
    assert spread_last_axis(torch.rand(1, 5, 6), h).shape == (1, 5, 6)  # no axis of size 1: kept


def test_reverse_jacobian_writes_into_the_callers_buffer():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64)
    y = w @ x.reshape(-1)
    out = torch.full((5, 3, 4), float("nan"), dtype=torch.float64)
    assert reverse_jacobian(y, x, 2, False, "", out=out) is out
    torch.testing.assert_close(out, w.reshape(5, 3, 4), rtol=0, atol=0)


@pytest.fixture(autouse=True)
def untuned_allocator(monkeypatch):
    """No MALLOC_* settings of the user's, which retained_heap leaves alone."""
    for name in (*heap.USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


class FakeLibc:
    """Records mallopt/malloc_trim calls in place of glibc."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_retained_heap_sets_once_when_nested_and_trims_on_the_way_out(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_LIBC", libc)
    with heap.retained_heap():
        with heap.retained_heap():
            assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, heap.MMAP_INSIDE),
                                  ("mallopt", heap.M_TRIM_THRESHOLD, heap.RETAINED)]
        assert len(libc.calls) == 2  # the inner exit leaves the outer's setting
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, heap.MMAP_AFTER),
                              ("mallopt", heap.M_TRIM_THRESHOLD, heap.TRIM_AFTER), ("malloc_trim", 0)]
    with pytest.raises(ValueError), heap.retained_heap():  # an error inside still restores
        raise ValueError
    assert len(libc.calls) == 10 and libc.calls[-1] == ("malloc_trim", 0) and heap._depth == 0


def test_retained_heap_leaves_a_heap_it_could_not_set_or_the_user_set(monkeypatch):
    class OldGlibc(FakeLibc):  # glibc before 2.35 refuses an mmap threshold above 32 MiB
        def mallopt(self, param, value):
            super().mallopt(param, value)
            return int(param != heap.M_MMAP_THRESHOLD or value <= 32 << 20)

    libc = OldGlibc()
    monkeypatch.setattr(heap, "_LIBC", libc)
    with heap.retained_heap():
        pass
    assert [c[2] for c in libc.calls if c[:2] == ("mallopt", heap.M_MMAP_THRESHOLD)][:2] == [
        heap.MMAP_INSIDE, heap.MMAP_AFTER]  # refused, then glibc's own ceiling
    assert ("mallopt", heap.M_TRIM_THRESHOLD, heap.RETAINED) in libc.calls and heap._depth == 0
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_LIBC", libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    with heap.retained_heap():
        pass
    assert libc.calls == []  # the user's own allocator settings stand


def test_retained_heap_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_LIBC", None)
    with heap.retained_heap():
        assert heap._depth == 0  # not even counted


def test_the_dead_ops_fast_shapes_are_the_meta_kernels_shapes():
    """broadcast_shape, reduced_shape and concatenated_shape stand in for meta kernels on ops that only feed frozen
    values: they must give the same shapes, refuse what does not broadcast, and decline what they do not cover."""
    shapes = [(), (1,), (3,), (2, 1), (2, 3), (1, 3), (4, 1, 3), (4, 2, 1), (2, 2)]
    for a in shapes:
        for b in shapes:
            try:
                expected = tuple(torch.broadcast_shapes(a, b))
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    broadcast_shape(a, b)
                continue
            assert broadcast_shape(a, b) == expected
    x = torch.empty(2, 3, 4, device="meta")
    for name in ("mean", "sum"):
        for dim in (0, -1, (0, 2), [1], (-1, -3)):
            for keepdim in (True, False):
                expected = tuple(getattr(x, name)(dim, keepdim=keepdim).shape)
                assert reduced_shape(name, (x, dim), {"keepdim": keepdim}) == expected
                assert reduced_shape(name, (x, dim, keepdim), {}) == expected
    assert reduced_shape("mean", (x,), {}) is None and reduced_shape("mean", (x, 3), {}) is None  # all, out of range
    assert reduced_shape("mean", (x, -1), {"dtype": torch.float64}) is None
    assert reduced_shape("amax", (x, 0), {}) is None and reduced_shape("sum", (x, (0, -3)), {}) is None  # twice
    y = torch.empty(2, 5, 4, device="meta")
    assert concatenated_shape("cat", ([x, y], 1), {}) == tuple(torch.cat([x, y], 1).shape)
    assert concatenated_shape("cat", ((x, x),), {"dim": -1}) == tuple(torch.cat((x, x), -1).shape)
    assert concatenated_shape("cat", ([x, y],), {}) is None  # sizes differ off the axis: the meta kernel's error
    assert concatenated_shape("cat", ([x, x.double()], 0), {}) is None  # dtypes promote: the meta kernel decides


def test_metadata_signature_keys_on_what_a_meta_kernel_reads():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert metadata_signature((a, slice(0, 2), 1), {"dim": -1}) == metadata_signature((b, slice(0, 2), 1), {"dim": -1})
    assert metadata_signature((a, 1), {}) != metadata_signature((a, 1.0), {})  # 1 and 1.0 hash alike
    assert metadata_signature((a,), {}) != metadata_signature((a.t().contiguous().t(),), {})  # strides differ
    assert metadata_signature((a,), {"x": object()}) is None  # not hashable: never remembered
    assert metadata_signature((a, slice(torch.tensor(0), 2)), {}) is None


def test_a_sweep_computes_each_dead_ops_shape_once_per_window_and_the_same_numbers(monkeypatch):
    """Chunks of one token window meet the same dead ops with the same shapes: the meta kernels run for the first
    chunk alone, and the Jacobians are bit for bit those computed without remembering."""
    from lllm.kernel import mode
    from lllm.kernel.layers import cumulative_jacobians
    from tiny import IdsTokenizer, tiny_model

    model, ids = tiny_model("llama"), [5, 17, 3, 40, 9]
    counts = {"dead": 0, "kept": 0}
    run_dead = mode.LinearizingMode._dead

    def counted(self, func, args, kwargs):
        counts["dead"] += 1
        counts["kept"] = max(counts["kept"], len(self.lin.dead_results))
        return run_dead(self, func, args, kwargs)

    monkeypatch.setattr(mode.LinearizingMode, "_dead", counted)
    remembered = cumulative_jacobians(model, IdsTokenizer(), ids, method="forward", chunk_size=8, progress=False)
    with_memo, kept = counts["dead"], counts["kept"]
    assert 0 < kept and kept * 4 < with_memo  # one window's shapes are kept at a time, not all five windows'
    counts["dead"] = 0
    monkeypatch.setattr(mode, "metadata_signature", lambda args, kwargs: None)  # nothing remembered
    computed = cumulative_jacobians(model, IdsTokenizer(), ids, method="forward", chunk_size=8, progress=False)
    assert with_memo * 2 < counts["dead"]  # d = 32 in chunks of 8: four chunks per window, meta kernels once
    for comp in computed.jacobian:
        assert torch.equal(remembered.jacobian[comp], computed.jacobian[comp])
    signatures = {"n": 0}

    def counted_signature(args, kwargs):
        signatures["n"] += 1

    monkeypatch.setattr(mode, "metadata_signature", counted_signature)
    counts["kept"] = 0
    whole = cumulative_jacobians(model, IdsTokenizer(), ids, method="forward", chunk_size=32, progress=False)
    assert signatures["n"] == 0 and counts["kept"] == 0  # one pass per window: nothing to reuse, nothing computed
    for comp in computed.jacobian:
        torch.testing.assert_close(whole.jacobian[comp], computed.jacobian[comp], rtol=1e-6, atol=1e-6)
