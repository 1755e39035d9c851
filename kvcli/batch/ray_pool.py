"""`RayPool`: workers as Ray actors, each loading the model once, on a local Ray or a cluster.

One actor per GPU (`num_gpus=1`: Ray gives each its own device), or `workers` actors sharing the
CPUs. The driver hands each idle actor one task at a time, so a slow document holds up one worker,
not a queue. Actors are created with no automatic restarts or task retries (Ray's at-most-once
default): when one dies (its process killed, out of memory, its machine gone), the driver starts a
replacement in its place and runs the task again, at most `attempts` times in all; then the task
is given up (`Outcome.lost`) and the rest go on. A machine that leaves the cluster takes its
workers with it: the driver says so once (`report`), replaces each of them, and runs their tasks
again on the others; a replacement waits for room, so a machine that joins takes it. With one
worker per GPU (no `workers` given), a machine that joins also gets a worker for each new GPU.
An exception inside a task is not a death: a
`KvcliError` comes back as itself (one line for the user), anything else as Ray's error with the
worker's traceback. Ray is imported only here, only when a pool is made.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..errors import KvcliError
from .runner import Outcome
from .work import ModelSpec, Worker

INSTALL = "--ray needs Ray, which is not installed: pip install 'kvcli[ray]'"
ATTEMPTS = 2  # a task whose worker died this many times is given up
POLL_S = 1.0  # how often the driver looks for GPUs that joined the cluster, or nodes that left it
SUSPECT_S = 60.0  # how long after a worker's death its node is watched for having left the cluster


def import_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KvcliError(INSTALL) from None
    return ray


class RayPool:
    """Actors running `work` (see `work.Worker`); `map` distributes tasks over them with retries.

    `address` joins a running cluster ("auto" finds the local one); without it a local Ray is
    started, unless this process already runs one. A Ray this pool started is shut down by `close`.
    `report(line)` is told when a machine (a Ray node) leaves the cluster or joins it with a worker.
    """

    def __init__(self, spec: ModelSpec, work, workers: int | None = None, address: str | None = None,
                 attempts: int = ATTEMPTS, worker_class: type = Worker, report: Callable[[str], None] | None = None) -> None:
        ray = self.ray = import_ray()
        if workers is not None and workers < 1:
            raise KvcliError(f"--workers must be at least 1, got {workers}")
        self.started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise KvcliError(f"could not {'join the Ray cluster at ' + address if address else 'start a local Ray'}: {str(exc).splitlines()[0]}") from None
            self.started_ray = True
        self.spec, self.work, self.attempts = spec, work, attempts
        self.report = report or (lambda line: None)
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0)(_on_node(worker_class))
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.grow = False  # whether the pool follows the cluster's GPUs (one worker per GPU, no --workers)
        self.gpus = gpus  # the cluster's GPUs when last looked
        if gpus and spec.device != "cpu":
            self.workers = workers or gpus
            self.resources = {"num_gpus": 1, "num_cpus": 1}
            self.grow = workers is None
        else:
            self.workers = workers or 1
            cpus = max(1, int(resources.get("CPU", 1)) // self.workers)
            self.resources = {"num_cpus": cpus}
            # torch would otherwise start a thread per core in every worker; --threads N is taken as asked
            self.spec = replace(spec, threads=spec.threads or cpus)
        self.actors: dict[int, object] = {}
        self.starting: dict[object, int] = {}  # ready() ref -> slot
        self.idle: list[int] = []
        self.startup_deaths: dict[int, int] = {}  # slot -> its actors' deaths while loading, in a row
        self.identity: dict | None = None
        self.deaths = 0  # actors that died, at load or on a task
        self.in_flight: dict[object, tuple[int, object, object, int]] = {}  # ref -> (slot, tag, task, attempt)
        self.node_of: dict[int, str] = {}  # slot -> the Ray node its running actor is on
        self.first_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        self.joined: set[str] = set()  # nodes not in the cluster at the start, where a worker started since
        self.lost: set[str] = set()  # nodes that left the cluster with workers on them
        self.suspects: dict[str, tuple[int, float]] = {}  # node -> (its workers that died, when the last did)
        self.slots = self.workers  # slot numbers handed out so far
        for slot in range(self.workers):
            self._spawn(slot)
        try:
            while self.identity is None:  # the first worker up names the model; a model that cannot load fails here
                self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _spawn(self, slot: int) -> None:
        actor = self.actor_class.options(**self.resources).remote(self.spec, self.work)
        self.actors[slot] = actor
        self.starting[actor.ready.remote()] = slot

    def _wait_ready(self) -> None:
        ready, _ = self.ray.wait(list(self.starting), num_returns=1)
        self._started(ready[0])

    def _started(self, ref) -> None:
        ray = self.ray
        slot = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as exc:  # died while loading the model (on which node is not known yet)
            self._died(slot)
            self.startup_deaths[slot] = self.startup_deaths.get(slot, 0) + 1
            if self.startup_deaths[slot] < self.attempts:
                self._spawn(slot)
            else:  # this slot's workers keep dying on load: the others go on without it
                self.actors.pop(slot)
                if not self.actors:
                    raise KvcliError(f"every Ray worker died while loading the model ({_first_line(exc)}); is there memory for it on each worker?") from None
            return
        if "error" in info:
            raise KvcliError(info["error"])
        if self.identity is None:
            self.identity = info["identity"]
        elif info["identity"] != self.identity:
            raise KvcliError(f"the Ray workers loaded different models ({self.identity} and {info['identity']}); give every machine the same model")
        self.startup_deaths.pop(slot, None)
        node = self.node_of[slot] = info["node"]
        if node not in self.first_nodes and node not in self.joined:
            self.joined.add(node)
            self.report(f"Ray node {self._name(node)} joined the cluster; a worker started on it")
        self.idle.append(slot)

    def map(self, tasks):
        """Yield `(tag, Outcome)` for each `(tag, task)`, in the order they finish; a task is taken
        from `tasks` only when a worker is free for it."""
        ray = self.ray
        source = iter(tasks)
        exhausted = False
        retry: deque = deque()
        self.in_flight.clear()
        while True:
            while self.idle and (retry or not exhausted):
                if retry:
                    slot = self._take_idle(retrying=True)
                    if slot is None:
                        break
                    tag, task, attempt = retry.popleft()
                else:
                    try:
                        tag, task = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    attempt = 1
                    slot = self._take_idle()
                self.in_flight[self.actors[slot].run.remote(task)] = (slot, tag, task, attempt)
            if not self.in_flight and not retry and exhausted:
                return
            if not self.in_flight and not self.starting:
                raise KvcliError("no Ray worker is left to run the remaining tasks")
            if self.grow:
                self._grow()
            self._look_for_lost_nodes()
            poll = self.grow or self.suspects
            ready, _ = ray.wait(list(self.in_flight) + list(self.starting), num_returns=1, timeout=POLL_S if poll else None)
            if not ready:
                continue
            ref = ready[0]
            if ref in self.starting:
                self._started(ref)
                continue
            slot, tag, task, attempt = self.in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, KvcliError):
                    raise cause from None
                raise
            except ray.exceptions.RayError as exc:  # the actor died (killed, out of memory, node lost)
                self._died(slot)
                self._replace(slot)
                if attempt >= self.attempts:
                    yield tag, Outcome(lost=f"the worker died {attempt} times while on this job ({_first_line(exc)}); not tried again", attempts=attempt)
                else:
                    retry.append((tag, task, attempt + 1))
                continue
            self.idle.append(slot)
            yield tag, Outcome(result, attempts=attempt)

    def _take_idle(self, retrying: bool = False) -> int | None:
        """An idle slot to run a task on. A job whose worker just died goes to a worker on a node where
        none died (a suspect node may be dying, not yet marked dead by Ray's health checks, and a second
        death would give the job up), or waits (None) while only suspects are free and others work."""
        if retrying:
            for slot in reversed(self.idle):
                if self.node_of.get(slot) not in self.suspects:
                    self.idle.remove(slot)
                    return slot
            if self.in_flight or self.starting:
                return None
        return self.idle.pop()

    def _grow(self) -> None:
        """When the cluster's GPUs grew (a machine joined), a worker for each GPU beyond the pool's
        (replacements waiting for room included). Only on growth: a slot given up is not refilled."""
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        if gpus > self.gpus:
            while len(self.actors) < gpus:
                self._spawn(self.slots)
                self.slots += 1
                self.workers += 1
        self.gpus = gpus

    def _died(self, slot: int) -> None:
        """Count the death of `slot`'s actor, and look whether its node left the cluster."""
        self.deaths += 1
        node = self.node_of.pop(slot, None)
        if node is not None and node not in self.lost:
            count, _ = self.suspects.get(node, (0, 0.0))
            self.suspects[node] = (count + 1, time.monotonic())
            self._look_for_lost_nodes()

    def _look_for_lost_nodes(self) -> None:
        """Report each node where a worker died that Ray now counts as dead, once, and replace its
        idle workers (their next task would die). A machine that fails abruptly is counted dead only
        after Ray's health checks (seconds), later than its workers' deaths: suspects are looked at
        again every POLL_S, for up to SUSPECT_S."""
        if not self.suspects:
            return
        alive = {entry["NodeID"] for entry in self.ray.nodes() if entry["Alive"]}
        for node, (died, since) in list(self.suspects.items()):
            if node in alive:
                if time.monotonic() - since > SUSPECT_S:  # only its worker died
                    del self.suspects[node]
                continue
            del self.suspects[node]
            self.lost.add(node)
            on_it = [other for other, where in self.node_of.items() if where == node]
            workers = died + len(on_it)
            self.report(f"lost Ray node {self._name(node)} with {workers} worker{'s' if workers != 1 else ''} on it; "
                        "the jobs they were running are run again on other workers")
            for other in on_it:
                if other in self.idle:
                    self.idle.remove(other)
                    self.node_of.pop(other)
                    self.deaths += 1
                    self._replace(other)

    def _name(self, node: str) -> str:
        """A node as `ray status` names it: its address and the start of its id."""
        address = next((entry["NodeManagerAddress"] for entry in self.ray.nodes() if entry["NodeID"] == node), "?")
        return f"{address} ({node[:8]})"

    def _replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self._spawn(slot)

    def close(self) -> None:
        """Stop the actors (and the local Ray this pool started); safe to call twice."""
        ray = self.ray
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
        self.starting.clear()
        self.idle.clear()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False


def _on_node(worker_class: type) -> type:
    """`worker_class` whose `ready()` also says which Ray node it runs on (to tell a lost machine
    from a lost process); same name, so Ray still titles its processes `ray::Worker.run`."""

    class OnNode(worker_class):
        def ready(self) -> dict:
            import ray

            return {**super().ready(), "node": ray.get_runtime_context().get_node_id()}

    OnNode.__name__, OnNode.__qualname__ = worker_class.__name__, worker_class.__qualname__
    return OnNode


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
