"""The steering program and the group-order bookkeeping, without a kernel.

A small classic BPF interpreter runs the built programs the way the kernel
would (for the opcodes they use), so each property is checked on every
reduced hash value rather than on a sample of connections.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upgraderd.system import steering
from upgraderd.system.steering import Group, Program

RXHASH = (steering.SKF_AD_OFF + steering.SKF_AD_RXHASH) & 0xFFFFFFFF
RANDOM = (steering.SKF_AD_OFF + steering.SKF_AD_RANDOM) & 0xFFFFFFFF


def run(prog: Program, rxhash: int, rand: int = 7) -> int:
    """Return what `prog` returns for a packet whose flow hash is `rxhash`."""
    a, pc = 0, 0
    for _ in range(len(prog) + 1):           # no backward jumps in cBPF: this bounds the run
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == steering.BPF_LD_W_ABS:
            a = {RXHASH: rxhash, RANDOM: rand}[k]
        elif code == steering.BPF_ALU_MOD_K:
            a %= k
        elif code == steering.BPF_ALU_ADD_K:
            a = (a + k) & 0xFFFFFFFF
        elif code == steering.BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == steering.BPF_RET_K:
            return k
        elif code == steering.BPF_RET_A:
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("the program ran off its end")


@given(st.sets(st.integers(0, 40), min_size=1, max_size=20))
def test_every_hash_goes_to_an_allowed_position_and_every_one_is_reached(allowed):
    prog = steering.program(allowed)
    n = len(allowed)
    seen = [run(prog, h) for h in range(1, 3 * n + 1)]
    assert set(seen) == allowed
    # Even: each allowed position takes exactly 3 of 3n consecutive hashes.
    assert all(seen.count(p) == 3 for p in allowed)


def test_a_prefix_is_three_loads_a_mod_and_a_return():
    assert steering.program([0, 1]) == (
        (steering.BPF_LD_W_ABS, 0, 0, RXHASH),
        (steering.BPF_JEQ_K, 0, 1, 0),
        (steering.BPF_LD_W_ABS, 0, 0, RANDOM),
        (steering.BPF_ALU_MOD_K, 0, 0, 2),
        (steering.BPF_RET_A, 0, 0, 0),
    )


def test_a_contiguous_run_adds_its_start_and_a_gap_uses_a_table():
    assert steering.program([2, 3])[-2:] == ((steering.BPF_ALU_ADD_K, 0, 0, 2), (steering.BPF_RET_A, 0, 0, 0))
    gap = steering.program([0, 5, 9])
    assert len(gap) == 4 + 2 * 2 + 1
    assert gap[-1] == (steering.BPF_RET_K, 0, 0, 9)


def test_a_zero_hash_draws_a_random_number_instead():
    prog = steering.program([0, 1, 2])
    assert {run(prog, 0, rand=r) for r in range(6)} == {0, 1, 2}


@pytest.mark.parametrize("bad", [[], [-1, 2]])
def test_an_impossible_set_is_refused(bad):
    with pytest.raises(ValueError):
        steering.program(bad)


def test_a_set_too_large_for_a_table_uses_part_of_it_and_a_run_any_length():
    huge = set(range(0, 6000, 2))
    prog = steering.program(huge)
    assert len(prog) <= 4096
    assert {run(prog, h) for h in range(1, 5000)} <= huge
    assert len(steering.program(range(5, 6005))) == 6


def test_encode_lays_out_struct_sock_filter():
    code = steering.encode(((0x20, 0, 0, RXHASH), (0x15, 1, 2, 3)))
    assert code == struct.pack("=HBBI", 0x20, 0, 0, RXHASH) + struct.pack("=HBBI", 0x15, 1, 2, 3)
    assert len(code) == 16


def test_leave_moves_the_last_member_into_the_hole():
    g: Group[str] = Group(["a", "b", "c", "d"], allowed=frozenset("abd"))
    g.leave("b")
    assert g.members == ["a", "d", "c"] and g.allowed == frozenset("ad")
    g.leave("c")
    assert g.members == ["a", "d"]
    g.leave("a")
    assert g.members == ["d"]


def test_closing_last_first_moves_nobody():
    g: Group[str] = Group(["a", "b", "c", "d"])
    assert g.order_of(["b", "d", "c"]) == ["d", "c", "b"]


@settings(max_examples=300)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n - 1), st.sets(st.integers(0, n - 1), min_size=1))))
def test_the_leave_plan_names_the_same_sockets_before_and_after_the_close(case):
    n, leaving, allowed = case
    members = [f"s{i}" for i in range(n)]
    g: Group[str] = Group(list(members), allowed=frozenset(members[i] for i in allowed))
    key = members[leaving]
    plan = g.leave_plan(key)
    rest = g.allowed - {key}
    if not rest:
        assert plan is None
        return
    assert plan is not None
    before = {g.members[run(plan, h)] for h in range(1, 4 * n)}
    assert before <= rest
    after_group = Group(list(g.members))
    after_group.leave(key)
    after = set()
    for h in range(1, 4 * n):
        i = run(plan, h)
        # Out of range after the close only when the moving socket was the one choice left.
        if i >= len(after_group.members):
            assert rest == {members[-1]}
            continue
        after.add(after_group.members[i])
    assert after <= rest
