"""Placement lanes: bounded, FIFO within a queue, queued jobs before new ones."""

from __future__ import annotations

import asyncio

from shoal_requester.domain.lanes import PlacementLanes


async def _take(lanes: PlacementLanes, name: str, order: list[str], *, first: bool) -> None:
    async with lanes.lane(first=first):
        order.append(name)
        await asyncio.sleep(0)


async def _queue_behind_a_held_lane(
    lanes: PlacementLanes, order: list[str], waiters: list[tuple[str, bool]]
) -> list[asyncio.Task[None]]:
    tasks = []
    for name, first in waiters:
        tasks.append(asyncio.create_task(_take(lanes, name, order, first=first)))
        await asyncio.sleep(0)  # each waiter queues in the order given
    return tasks


async def test_waiters_marked_first_get_a_freed_lane_before_earlier_others() -> None:
    lanes = PlacementLanes(1)
    order: list[str] = []
    async with lanes.lane():
        tasks = await _queue_behind_a_held_lane(
            lanes,
            order,
            [("new-1", False), ("new-2", False), ("queued-1", True), ("queued-2", True)],
        )
        assert lanes.waiting == 4
    await asyncio.gather(*tasks)
    assert order == ["queued-1", "queued-2", "new-1", "new-2"]
    assert lanes.waiting == 0


async def test_no_more_than_the_given_lanes_are_held_at_once() -> None:
    lanes = PlacementLanes(3)
    holding = most = 0

    async def work() -> None:
        nonlocal holding, most
        async with lanes.lane():
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.001)
            holding -= 1

    await asyncio.gather(*(work() for _ in range(12)))
    assert most == 3


async def test_a_cancelled_waiter_does_not_keep_a_lane() -> None:
    lanes = PlacementLanes(1)
    order: list[str] = []
    async with lanes.lane():
        gone, later = await _queue_behind_a_held_lane(
            lanes, order, [("gone", True), ("later", False)]
        )
        gone.cancel()
        await asyncio.sleep(0)
    await asyncio.gather(gone, later, return_exceptions=True)
    assert order == ["later"]
    async with asyncio.timeout(1):  # the lane is free again
        async with lanes.lane():
            pass


async def test_a_waiter_cancelled_as_it_is_handed_the_lane_passes_it_on() -> None:
    lanes = PlacementLanes(1)
    order: list[str] = []
    holder = lanes.lane()
    await holder.__aenter__()
    handed, later = await _queue_behind_a_held_lane(
        lanes, order, [("handed", False), ("later", False)]
    )
    await holder.__aexit__(None, None, None)  # hands the lane to "handed"...
    handed.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(handed, later, return_exceptions=True)
    assert order == ["later"]
