"""Which waiting sequence joins the running batch next: per-adapter queues and a fairness rule.

Waiting sequences queue per tenant, the adapter they run with (`BASE_TENANT` for the base
model). Two policies choose the order in which the scheduler offers them admission:

- `fair` (the default): virtual token counters, after S-LoRA's VTC ("Fairness in Serving Large
  Language Models", OSDI '24). Every token the engine computes for a tenant adds 1/weight to its
  counter; admission offers the head of the backlogged tenant whose counter is smallest. A tenant
  that starts waiting again has its counter lifted to the smallest backlogged one, so time spent
  idle banks no credit. A client that floods one adapter then delays that adapter's requests, not
  everyone's. A weighted mixture of adapters waits in its heaviest component's queue, and its
  tokens are charged to its components in proportion to their |weights|.
- `fcfs`: arrival order over all tenants, one queue.

A preempted sequence goes back to the front (of its tenant's queue, and of the arrival order).
The scheduler may skip a sequence it is offered (its adapter cannot get a slot, its tenant is at
its running limit): under `fair` the tenant then sits out the rest of that admission round.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.scheduler import Sequence

BASE_TENANT = ""


def tenant_of(seq: Sequence) -> str:
    """The queue a sequence waits in: its adapter's, the base model's, or for a mixture the
    queue of its heaviest component."""
    if seq.mixture is not None:
        return seq.mixture.primary
    return seq.adapter.key.name if seq.adapter is not None else BASE_TENANT



class WaitingQueue:
    """The waiting sequences, counted per tenant; `offers()` is the policy's admission order."""

    def __init__(self):
        self.counts: Counter[str] = Counter()  # waiting sequences per tenant (zero counts dropped)

    def __len__(self) -> int:
        return self.counts.total()

    def __bool__(self) -> bool:
        return bool(self.counts)

    def push(self, seq: Sequence) -> None:
        """A new arrival: last in line."""
        self.counts[tenant_of(seq)] += 1
        self._push(seq)

    def push_front(self, seq: Sequence) -> None:
        """A preempted sequence: first in line."""
        self.counts[tenant_of(seq)] += 1
        self._push_front(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes `seq` out of the queue (admitted or cancelled); it must be waiting."""
        tenant = tenant_of(seq)
        self._remove(seq, tenant)
        self.counts[tenant] -= 1
        if not self.counts[tenant]:
            del self.counts[tenant]

    def charge(self, seq: Sequence, tokens: int) -> None:
        """The engine computes `tokens` tokens of `seq` this step (for its tenants)."""

    def offers(self) -> Iterator[Sequence]:
        """Sequences in the order the policy admits them. The scheduler removes each it admits
        before asking for the next; one it leaves in place is skipped."""
        raise NotImplementedError

    def _push(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _push_front(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _remove(self, seq: Sequence, tenant: str) -> None:
        raise NotImplementedError


class FcfsQueue(WaitingQueue):
    def __init__(self):
        super().__init__()
        self._line: deque[Sequence] = deque()

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._line

    def _push(self, seq: Sequence) -> None:
        self._line.append(seq)

    def _push_front(self, seq: Sequence) -> None:
        self._line.appendleft(seq)

    def _remove(self, seq: Sequence, tenant: str) -> None:
        if self._line and self._line[0] is seq:
            self._line.popleft()
        else:
            self._line.remove(seq)

    def offers(self) -> Iterator[Sequence]:
        yield from list(self._line)  # a copy: the scheduler removes what it admits


class FairQueue(WaitingQueue):
    def __init__(self, weights: dict[str, float] | None = None):
        """`weights`: tenant -> share (default 1); a tenant of weight 2 gets twice the tokens of
        a tenant of weight 1 when both are backlogged."""
        super().__init__()
        self.weights = dict(weights or {})
        self.counters: dict[str, float] = {}  # virtual tokens per tenant ever seen
        self._queues: dict[str, deque[Sequence]] = {}  # backlogged tenants only
        self._floor = 0.0  # the counter of the tenant admitted last: the lift when none waits
        self._order = itertools.count()  # ties go to the tenant that became backlogged first
        self._since: dict[str, int] = {}

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._queues.get(tenant_of(seq), ())

    def charge(self, seq: Sequence, tokens: int) -> None:
        if seq.mixture is None:
            self._charge(tenant_of(seq), tokens)
            return
        for tenant, share in seq.mixture.shares.items():  # split by the weights
            self._charge(tenant, tokens * share)

    def _charge(self, tenant: str, tokens: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / self.weights.get(tenant, 1.0)

    def _push(self, seq: Sequence) -> None:
        tenant = tenant_of(seq)
        if tenant not in self._queues:  # starts waiting: no credit for the time it did not
            lift = min((self.counters[t] for t in self._queues), default=self._floor)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), lift)
        self._queue(tenant).append(seq)

    def _push_front(self, seq: Sequence) -> None:
        tenant = tenant_of(seq)
        self.counters.setdefault(tenant, self._floor)
        self._queue(tenant).appendleft(seq)

    def _queue(self, tenant: str) -> deque[Sequence]:
        """The tenant's queue, opened (and placed in the tie order) if it had none."""
        if tenant not in self._queues:
            self._queues[tenant] = deque()
            self._since[tenant] = next(self._order)
        return self._queues[tenant]

    def _remove(self, seq: Sequence, tenant: str) -> None:
        queue = self._queues[tenant]
        if queue[0] is seq:
            queue.popleft()
        else:
            queue.remove(seq)
        if not queue:
            del self._queues[tenant], self._since[tenant]

    def offers(self) -> Iterator[Sequence]:
        heap = [(self.counters[t], self._since[t], t) for t in self._queues]
        heapq.heapify(heap)
        while heap:
            _, _, tenant = heapq.heappop(heap)
            head = self._queues[tenant][0]
            yield head
            queue = self._queues.get(tenant)
            if queue and queue[0] is head:
                continue  # skipped: the tenant sits out this round
            self._floor = self.counters[tenant]
            if queue:  # admitted (and charged for its first chunk): back in line by its counter
                heapq.heappush(heap, (self.counters[tenant], self._since[tenant], tenant))


def make_waiting_queue(policy: str, weights: dict[str, float] | None = None) -> WaitingQueue:
    if policy == "fcfs":
        return FcfsQueue()
    return FairQueue(weights)
