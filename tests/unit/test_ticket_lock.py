"""The writers' queue in front of SQLite (db/uow.TicketLock): first come,
first served, one writer at a time, and the lock handed to exactly the next
waiter."""

from __future__ import annotations

import threading
import time

from edgefleet.controlplane.db.uow import TicketLock


def test_waiters_get_the_lock_in_arrival_order_one_at_a_time() -> None:
    lock = TicketLock()
    order: list[str] = []
    inside = 0
    most_inside = 0
    guard = threading.Lock()

    def writer(name: str) -> None:
        nonlocal inside, most_inside
        lock.acquire()
        with guard:
            inside += 1
            most_inside = max(most_inside, inside)
            order.append(name)
        time.sleep(0.01)
        with guard:
            inside -= 1
        lock.release()

    lock.acquire()  # held, so every writer below has to queue
    threads = []
    for name in "abcdef":
        t = threading.Thread(target=writer, args=(name,))
        t.start()
        threads.append(t)
        while len(lock._waiters) < len(threads):  # queued before the next arrives
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list("abcdef")
    assert most_inside == 1
    assert not lock._held and not lock._waiters
