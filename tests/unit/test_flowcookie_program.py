"""The `flows: cookie` program's table, as a group's members come and go (no kernel)."""

from __future__ import annotations

from upgraderd.system import flowcookie, steering

K = tuple[str, int, str, int]


def key(gen: int, slot: int) -> K:
    return ("127.0.0.1", 7777, f"udp/cookie@{gen}", slot)


def table(prog: steering.Program) -> dict[int, int]:
    """Return cookie -> position from a program built by flowcookie.program."""
    body = prog[4:]
    out = {}
    for a, b in zip(body, body[1:]):
        if a[0] == steering.BPF_JEQ_K and (a[1], a[2]) == (0, 1) and b[0] == steering.BPF_RET_K:
            out[a[3]] = b[3]
    return out


def group(*keys: K) -> steering.Group[K]:
    g: steering.Group[K] = steering.Group(cookie_of=flowcookie.key_cookie, cookie_program=flowcookie.program)
    for k in keys:
        g.join(k)
    return g


def test_every_member_with_a_cookie_is_in_the_table_and_the_default_is_the_allowed_set():
    g = group(key(1, 0), key(1, 1), key(2, 0), key(2, 1))
    g.allowed = frozenset({key(2, 0), key(2, 1)})
    prog = g.want()
    assert prog is not None
    assert table(prog) == {flowcookie.cookie_value(1, 0): 0, flowcookie.cookie_value(1, 1): 1,
                           flowcookie.cookie_value(2, 0): 2, flowcookie.cookie_value(2, 1): 3}
    assert prog[-len(steering.program([2, 3])):] == steering.program([2, 3])


def test_while_a_socket_leaves_neither_it_nor_the_last_member_is_in_the_table():
    g = group(key(1, 0), key(1, 1), key(2, 0), key(2, 1))
    g.allowed = frozenset({key(2, 0), key(2, 1)})
    plan = g.leave_plan(key(1, 0))
    assert plan is not None
    # key(2, 1) is last: it moves into index 0 when key(1, 0) closes.
    assert table(plan) == {flowcookie.cookie_value(1, 1): 1, flowcookie.cookie_value(2, 0): 2}
    g.leave(key(1, 0))
    after = g.want()
    assert after is not None
    assert table(after)[flowcookie.cookie_value(2, 1)] == 0


def test_a_group_without_ready_slots_hashes_unknown_cookies_over_every_socket():
    g = group(key(3, 0))
    prog = g.want(keys=())
    assert prog is not None and prog[-1] == (steering.BPF_RET_K, 0, 0, 0xFFFFFFFF)
    assert flowcookie.key_cookie(("127.0.0.1", 1, "udp/reuseport", 0)) is None
    assert flowcookie.cookie(65537, 2) == b"\x00\x01\x00\x02"   # generations wrap at 65,536
