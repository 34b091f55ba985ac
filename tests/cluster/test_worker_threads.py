"""Which thread of a worker actor runs what (`cluster.rendezvous.CONTROL`): the work (an attention
worker's steps, an expert worker's loop, a vision worker's encodes) on the default group's one
thread, always the same one, and every other call on the control group's thread, so that pings
are answered while the work blocks. The fault tests check the behaviour (a hung worker is found
by ping, healthy ones are not); these check the wiring that behaviour rests on."""

from __future__ import annotations

import inspect

import pytest

from cluster.attention_worker import AttentionWorker
from cluster.expert_worker import ExpertWorker
from cluster.rendezvous import CONCURRENCY_GROUPS, CONTROL
from cluster.resize import Bundle
from cluster.vision_worker import VisionWorker

WORK = {
    AttentionWorker: {"step", "load_routers"},  # load_routers: between two steps, on the work thread
    ExpertWorker: {"run_loop"},
    VisionWorker: {"encode"},
}


@pytest.mark.parametrize("cls", list(WORK), ids=lambda c: c.__name__)
def test_work_on_the_default_group_and_every_other_call_on_control(cls):
    public = [name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")]
    assert WORK[cls] <= set(public)
    for name in public:
        group = getattr(getattr(cls, name), "__ray_concurrency_group__", None)
        assert group == (None if name in WORK[cls] else CONTROL), f"{cls.__name__}.{name} runs on {group}"


def test_the_work_group_has_one_thread_and_control_one():
    options = Bundle(group=None, index=0, spec={"CPU": 1.0}).options()
    assert options["max_concurrency"] == 1
    assert CONCURRENCY_GROUPS == {CONTROL: 1}
