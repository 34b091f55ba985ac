"""Headers through the driver's store: in order, per epoch, old ones deleted; a reader waits."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from cluster.membership import Command, Header, HeaderBoard, HeaderReader, connect
from cluster.rendezvous import first_line


def test_header_round_trip():
    h = Header(epoch=3, step_id=2**40, placement_version=7, command=Command.LEAVE)
    assert Header.decode(h.encode()) == h


def test_headers_arrive_in_order_and_each_epoch_has_its_own():
    board = HeaderBoard("127.0.0.1")
    client = connect(board.address)
    epoch = board.new_epoch()
    reader = HeaderReader(client, epoch)
    got = []
    t = threading.Thread(target=lambda: got.append(reader.next()))
    t.start()  # waits: nothing is written yet
    board.publish(0, 0)
    t.join(timeout=30)
    board.publish(1, 0)
    got.append(reader.next())
    board.publish(-1, 0, Command.STOP)  # header 0 goes: every reader has read it
    got.append(reader.next())
    assert [(h.step_id, h.command) for h in got] == [(0, Command.STEP), (1, Command.STEP), (-1, Command.STOP)]
    assert not client.check([f"hdr/{epoch}/0"]) and client.check([f"hdr/{epoch}/1", f"hdr/{epoch}/2"])
    second = board.new_epoch()
    assert not client.check([f"hdr/{epoch}/1"]) and not client.check([f"hdr/{epoch}/2"])
    board.publish(5, 1)
    assert HeaderReader(client, second).next() == Header(second, 5, 1, Command.STEP)


def test_gloo_errors_lose_their_source_path():
    e = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"
    )
    assert first_line(e) == "Connection closed by peer"
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_a_reader_of_a_dead_store_fails_instead_of_hanging():
    board = HeaderBoard("127.0.0.1")
    client = connect(board.address)
    reader = HeaderReader(client, board.new_epoch())
    del board  # the driver is gone
    with pytest.raises(dist.DistError):
        reader.next()
