"""Where a sweep's independent units run: in this process (the default) or on a Ray cluster.

A sweep (pruning's ranker × fraction × eval rows, …) hands an executor a picklable `worker` factory and its jobs; the
executor calls `on_result(job, result)` in the driver as each job finishes, so the sweep writes its rows with its own
atomic, resumable writer as results arrive (a rerun after a crash of the driver skips what was written).

- `LocalExecutor`: builds one worker and runs the jobs one after another.
- `RayExecutor(address)`: `address` None starts a local Ray cluster of `workers` CPUs (stopped again afterwards);
  "auto" or "ray://host:port" joins a running one (`ray start --head` on the head node, `ray start
  --address=HEAD:6379` on the others; Ray's own docs cover the cluster). One Ray actor per worker builds the worker
  once (the model is loaded once per worker process); jobs are spread over the actors and gathered as they finish.
  An actor that dies (a killed process, a lost node) is restarted and its unfinished jobs are retried there
  (`max_restarts` / `max_task_retries`).

`parse_executor("local" | "ray" | "ray:ADDRESS")` is what the CLI's `--executor` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from headlab.errors import HeadlabError


class Worker(Protocol):
    """What an executor runs jobs on: built once per process by the sweep's factory."""

    def __call__(self, job: Any) -> Any: ...


class ExecutorError(HeadlabError):
    """An executor that cannot run here (Ray missing, a bad address) or a job that failed on a worker."""


@dataclass
class LocalExecutor:
    """Every job in this process, one after another (the default).

    Attributes:
        name: "local" (sweeps ask it to decide whether the worker may reuse the model already loaded here).
    """

    name: str = "local"

    def run(self, factory: Callable[[], Worker], jobs: Iterable[Any], on_result: Callable[[Any, Any], None]) -> None:
        """Build the worker with `factory()`, run each job on it and hand each result to `on_result(job, result)`.

        Args:
            factory: builds the worker (a callable taking one job).
            jobs: the independent units, in order.
            on_result: called in this process with each (job, result) as it finishes.
        """
        worker = factory()
        for job in jobs:
            on_result(job, worker(job))


class _Actor:
    """A Ray actor holding one worker (built once, in the actor's process)."""

    def __init__(self, factory: Callable[[], Worker], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.worker = factory()

    def run(self, job: Any) -> Any:
        return self.worker(job)

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class RayExecutor:
    """Jobs spread over Ray actors, one per worker; see the module docstring.

    Attributes:
        address: None (start a local cluster of `workers` CPUs, stopped afterwards), "auto" or "ray://HOST:PORT".
        workers: actors to start (each loads the model once).
        threads: torch threads per actor.
        max_restarts: times a dead actor is restarted (-1: always).
        max_task_retries: times a job of a dead actor is retried (-1: always).
        name: "ray".
        actors: while `run` runs, the Ray actor handles.
        pids: while `run` runs, the actors' process ids (in the order of `actors`).
    """

    address: str | None = None
    workers: int = 2
    threads: int = 1
    max_restarts: int = -1
    max_task_retries: int = 3
    name: str = "ray"
    actors: list = field(default_factory=list, repr=False)
    pids: list = field(default_factory=list, repr=False)

    def run(self, factory: Callable[[], Worker], jobs: Iterable[Any], on_result: Callable[[Any, Any], None]) -> None:
        """Run the jobs on `workers` actors; `on_result(job, result)` in this process as each one finishes.

        Args:
            factory: builds a worker in each actor (picklable: a dataclass or a module-level function).
            jobs: the independent units.
            on_result: called in this process with each (job, result), in completion order.

        Raises:
            ExecutorError: Ray is not installed, the cluster cannot be reached, or a job failed for good.
        """
        try:
            import ray
        except ImportError:
            raise ExecutorError("the Ray executor needs ray: pip install 'headlab[scale]' (or ray>=2.50)") from None
        started = not ray.is_initialized()
        if started:
            try:
                if self.address is None:
                    ray.init(num_cpus=self.workers * self.threads, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=self.address, log_to_driver=False)
            except Exception as err:  # a bad address fails deep inside Ray: say which
                raise ExecutorError(f"could not start or reach Ray at {self.address or 'a local cluster'}: "
                                    f"{type(err).__name__}: {err}") from err
        try:
            remote = ray.remote(num_cpus=self.threads, max_restarts=self.max_restarts,
                                max_task_retries=self.max_task_retries)(_Actor)
            self.actors = [remote.remote(factory, self.threads) for _ in range(max(1, self.workers))]
            self.pids = ray.get([actor.pid.remote() for actor in self.actors])  # every worker is up (model loaded)
            pending = {}
            for i, job in enumerate(jobs):
                pending[self.actors[i % len(self.actors)].run.remote(job)] = job
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:
                        raise ExecutorError(f"job {job!r} failed on a Ray worker: {type(err).__name__}: {err}") from err
                    on_result(job, result)
        finally:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self.actors = []
            if started:
                ray.shutdown()


def parse_executor(text: str | None, *, workers: int = 2, threads: int = 1) -> LocalExecutor | RayExecutor:
    """`local` (default), `ray` (a local cluster of `workers` actors) or `ray:ADDRESS` (join a running cluster).

    Args:
        text: the executor spec.
        workers: actors for Ray.
        threads: torch threads per actor.

    Returns:
        The executor.

    Raises:
        ExecutorError: an unknown spec.
    """
    text = (text or "local").strip()
    if text == "local":
        return LocalExecutor()
    if text == "ray":
        return RayExecutor(workers=workers, threads=threads)
    if text.startswith("ray:") and text[4:]:
        return RayExecutor(address=text[4:], workers=workers, threads=threads)
    raise ExecutorError(f"unknown executor {text!r}: use local, ray (a local cluster) or ray:ADDRESS "
                        "(e.g. ray:auto, ray:ray://head:10001)")
