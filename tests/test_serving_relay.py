"""The event relay of jaxbased.serving.app: events posted from another thread reach their
queues in order, and the events posted before the loop runs cost it one wake-up."""

from __future__ import annotations

import asyncio
import threading

from jaxbased.serving.app import _EventRelay
from jaxbased.serving.engine import FinishEvent, TokenEvent


def token(choice: int, token_id: int) -> TokenEvent:
    return TokenEvent(choice, token_id, str(token_id), -1.0, ())


def test_posts_from_another_thread_arrive_in_order_with_one_wake_up_per_batch():
    loop = asyncio.new_event_loop()
    wake_ups = []
    schedule = loop.call_soon_threadsafe

    def counting(callback, *args):
        wake_ups.append(callback)
        return schedule(callback, *args)

    loop.call_soon_threadsafe = counting  # count the hand-overs the relay schedules
    try:
        relay = _EventRelay(loop)
        first, second = asyncio.Queue(), asyncio.Queue()
        sent = {id(first): [], id(second): []}

        def engine_step(step: int) -> None:  # what one decode step of two slots posts
            for queue, choice in ((first, 0), (second, 1)):
                event = token(choice, 10 * step + choice)
                sent[id(queue)].append(event)
                relay.post(queue, event)

        thread = threading.Thread(target=lambda: [engine_step(step) for step in range(3)])
        thread.start()
        thread.join()
        assert len(wake_ups) == 1  # six events, the loop not yet run: one hand-over

        async def drain(queue: asyncio.Queue, count: int) -> list:
            return [await queue.get() for _ in range(count)]

        got_first = loop.run_until_complete(drain(first, 3))
        got_second = loop.run_until_complete(drain(second, 3))
        assert got_first == sent[id(first)]
        assert got_second == sent[id(second)]
        assert [event.token_id for event in got_first] == [0, 10, 20]

        relay.post(first, FinishEvent(0, "length"))  # after a hand-over: a new wake-up
        assert len(wake_ups) == 2
        assert loop.run_until_complete(drain(first, 1)) == [FinishEvent(0, "length")]
        assert second.empty()
    finally:
        loop.close()
