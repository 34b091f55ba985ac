"""The sockets transport: a real mesh through a real TCP store, one thread per rank (a socket call
releases the GIL), over Unix and TCP sockets; a peer that closes or stalls fails the call."""

from __future__ import annotations

import functools
import itertools
import threading
import time

import pytest
import torch
import torch.distributed as dist

from router.transport import SocketTransport, resolve_transport

TIMEOUT_S = 20.0
EPOCHS = itertools.count()


@functools.cache
def master() -> dist.TCPStore:
    """One store for the module, as the driver's lives as long as its engine (a client of a
    store made right after others were dropped took 5 s to connect here)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@functools.cache
def client(rank: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", master().port, is_master=False)


def mesh(peers: dict[int, range], unix: bool = True, timeout_s: float = TIMEOUT_S) -> dict:
    """Every rank's transport, joined concurrently as the cluster's workers join (each with a
    client of its own: a store client serves one call at a time), under a fresh prefix."""
    prefix = f"epoch{next(EPOCHS)}/"
    clients = {r: client(r) for r in peers}
    out, errors = {}, []

    def join(rank: int) -> None:
        try:
            store = dist.PrefixStore(prefix, clients[rank])
            out[rank] = SocketTransport.connect(store, rank, peers[rank], timeout_s, unix=unix)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=join, args=(r,)) for r in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(out) == len(peers)
    return out


def run_ranks(fns: dict[int, callable]) -> dict[int, object]:
    results, errors = {}, {}

    def run(rank: int) -> None:
        try:
            results[rank] = fns[rank]()
        except Exception as e:
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results | {r: e for r, e in errors.items()}


# one attention rank (0) and two expert ranks (1, 2), as the default cluster has them
STAR = {0: range(1, 3), 1: range(0, 1), 2: range(0, 1)}


@pytest.mark.parametrize("unix", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_arrive_exactly_split_by_rank(unix, dtype):
    ranks = mesh(STAR, unix=unix)
    assert ranks[0].kinds() == {1: "unix" if unix else "tcp", 2: "unix" if unix else "tcp"}
    rows = torch.randn(7, 5).to(dtype)
    counts = torch.tensor([3, 0, 2, 2], dtype=torch.long)

    def attention():
        ranks[0].send(counts[:2], [0, 1, 1])  # one count to each expert rank
        ranks[0].send(rows, [0, 3, 4])
        back = torch.empty(7, 5, dtype=dtype)
        ranks[0].recv(back, [0, 3, 4])
        return back

    def expert(r: int, n: int):
        def serve():
            count = torch.empty(1, dtype=torch.long)
            ranks[r].recv(count, [1, 0, 0])
            got = torch.empty(n, 5, dtype=dtype)
            ranks[r].recv(got, [n, 0, 0])
            ranks[r].send(got * 2, [n, 0, 0])
            return count.item(), got

        return serve

    got = run_ranks({0: attention, 1: expert(1, 3), 2: expert(2, 4)})
    assert got[1][0] == 3 and got[2][0] == 0
    assert torch.equal(got[1][1], rows[:3]) and torch.equal(got[2][1], rows[3:])
    assert torch.equal(got[0], rows * 2)
    for t in ranks.values():
        t.close()


def test_parts_go_in_one_message_per_destination_even_past_the_socket_buffer():
    ranks = mesh(STAR)
    counts = torch.tensor([5, 7], dtype=torch.long)
    rows = torch.randn(3000, 1024)  # 12 MB: more than one sendmsg takes

    def attention():
        ranks[0].send_parts([(counts, [0, 1, 1]), (rows, [0, 1000, 2000])])
        return True

    def expert(r: int, n: int):
        def receive():
            count, got = torch.empty(1, dtype=torch.long), torch.empty(n, 1024)
            ranks[r].recv(count, [1, 0, 0])
            ranks[r].recv(got, [n, 0, 0])
            return count.item(), got

        return receive

    got = run_ranks({0: attention, 1: expert(1, 1000), 2: expert(2, 2000)})
    assert got[0] is True
    assert got[1][0] == 5 and torch.equal(got[1][1], rows[:1000])
    assert got[2][0] == 7 and torch.equal(got[2][1], rows[1000:])


def test_a_part_of_size_zero_is_no_message():
    ranks = mesh(STAR)
    x = torch.arange(4.0).view(2, 2)

    def attention():
        ranks[0].send(x, [0, 0, 2])  # nothing for rank 1
        ranks[0].send(x[:1], [0, 1, 0])
        return True

    def expert1():
        got = torch.empty(1, 2)
        ranks[1].recv(got, [1, 0, 0])  # the first thing rank 1 reads is the second send
        return got

    def expert2():
        got = torch.empty(2, 2)
        ranks[2].recv(got, [2, 0, 0])
        return got

    got = run_ranks({0: attention, 1: expert1, 2: expert2})
    assert torch.equal(got[1], x[:1]) and torch.equal(got[2], x)


def test_a_peer_that_closes_fails_the_blocked_receive_at_once():
    ranks = mesh(STAR)

    def wait_for_rows():
        t0 = time.monotonic()
        try:
            ranks[1].recv(torch.empty(3, 4), [3, 0, 0])
        except ConnectionError as e:
            return str(e), time.monotonic() - t0
        return "no error", 0.0

    closer = threading.Timer(0.2, ranks[0].close)  # rank 0 leaves (its step failed)
    closer.start()
    message, waited = run_ranks({1: wait_for_rows})[1]
    assert "rank 0 closed its connection to rank 1" in message
    assert waited < TIMEOUT_S / 2  # not the timeout: the close woke it


@pytest.mark.parametrize("unix", [True, False])
def test_a_peer_that_goes_with_data_unread_is_named_too(unix):
    """Closing with unread bytes resets the connection (ECONNRESET on the other side), which must
    read like a peer that is gone, not like an OS error."""
    ranks = mesh(STAR, unix=unix)
    ranks[0].send(torch.ones(2, 4), [0, 2, 0])  # rank 1 never reads it
    ranks[1].close()
    with pytest.raises(ConnectionError, match=r"rank 1 is gone|rank 1 closed its connection to rank 0"):
        for _ in range(100):  # a send can still land in the buffer before the reset arrives
            ranks[0].send(torch.ones(2, 4), [0, 2, 0])
            ranks[0].recv(torch.empty(1, 4), [0, 1, 0])


def test_a_stalled_peer_times_out_with_the_ranks_named():
    ranks = mesh(STAR, timeout_s=0.5)
    with pytest.raises(TimeoutError, match=r"rank 0 did not send rank 2's data within 0.5 s"):
        ranks[2].recv(torch.empty(1, 4), [1, 0, 0])


def test_tensors_it_cannot_carry_are_refused():
    ranks = mesh(STAR)
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        ranks[0].send(torch.zeros(4, 3).t(), [0, 3, 0])


def test_resolving_the_transport():
    assert resolve_transport("auto", torch.device("cpu")) == "sockets"
    assert resolve_transport("auto", torch.device("cuda", 0)) == "collective"
    assert resolve_transport("collective", torch.device("cpu")) == "collective"
    with pytest.raises(ValueError, match="unknown transport 'shm'"):
        resolve_transport("shm", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_transport("sockets", torch.device("cuda", 0))
