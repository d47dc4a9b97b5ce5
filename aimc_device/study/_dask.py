"""Run independent tasks on Dask: synchronous, a LocalCluster, or an existing cluster.

The task functions are plain functions of their arguments (see ``_tasks.py``); where they run
does not change what they return.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence

__all__ = ["compute", "session", "scheduler_label"]


def scheduler_label(scheduler) -> str:
    """A short description of a scheduler argument, for the attrs of a result."""
    if scheduler is None:
        return "LocalCluster(processes, 2 workers)"
    if isinstance(scheduler, str):
        return scheduler
    return type(scheduler).__name__


@contextlib.contextmanager
def _client(scheduler, n_workers: int = 2):
    """Yield (dask scheduler argument, client or None) for ``scheduler``."""
    if isinstance(scheduler, str) and scheduler in ("synchronous", "sync", "single-threaded",
                                                    "threads", "processes"):
        yield ("synchronous" if scheduler == "sync" else scheduler), None
        return
    from distributed import Client

    if scheduler is None or scheduler == "local":
        from distributed import LocalCluster

        # silence_logs: the workers' heartbeat complaints while the cluster shuts down
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.CRITICAL) as cluster, \
                Client(cluster) as client:
            yield client, client
        return
    if isinstance(scheduler, Client):
        yield scheduler, scheduler
        return
    if isinstance(scheduler, str):  # the address of an existing cluster
        with Client(scheduler) as client:
            yield client, client
        return
    raise TypeError(f"scheduler: give None (a local cluster), 'synchronous', an address such as "
                    f"'tcp://host:8786' or a distributed.Client; got {type(scheduler).__name__}")


@contextlib.contextmanager
def session(scheduler):
    """Hold one scheduler (a LocalCluster for None) for several :func:`compute` calls.

    Yields the value to pass as ``scheduler`` to :func:`compute`.
    """
    with _client(scheduler) as (sched, client):
        yield sched if client is None else client


def compute(func, shared, calls: Sequence[tuple], scheduler=None, progress: bool = False,
            desc: str = "tasks", on_result=None) -> list:
    """``[func(shared[i], *args) for (i, *args) in calls]`` as Dask tasks.

    Parameters
    ----------
    func : callable(shared_item, *args)
        A module-level (picklable) function.
    shared : sequence
        Large inputs (model specs) sent once each and shared by the calls that name them.
    calls : sequence of tuple
        ``(index into shared, *args)`` per task.
    scheduler : None, str or distributed.Client
        None or "local": a LocalCluster of 2 worker processes (1 thread each);
        "synchronous" (in this process), "threads", "processes": dask's local schedulers; any other string
        is the address of an existing Dask scheduler; a Client is used as is.
    progress : bool
        Show a progress bar (tqdm) while the tasks run.
    desc : str
        Label of the progress bar.
    on_result : callable(i, result), optional
        Called in this process as each task ends (in the order they end), e.g. to checkpoint;
        on a dask local scheduler the tasks then run one after the other.

    Returns
    -------
    list, one result per call, in order.
    """
    import dask

    if not calls:
        return []
    with _client(scheduler) as (sched, client):
        if client is None and on_result is not None:
            from tqdm.auto import tqdm

            out = []
            for i, (si, *args) in enumerate(tqdm(calls, desc=desc, leave=False,
                                                 disable=not progress)):
                (res,) = dask.compute(dask.delayed(func, pure=True)(shared[si], *args),
                                      scheduler=sched)
                on_result(i, res)
                out.append(res)
            return out
        if client is None:
            shared_d = [dask.delayed(s, pure=True) for s in shared]
            tasks = [dask.delayed(func, pure=True)(shared_d[i], *args) for i, *args in calls]
            if progress and sched == "synchronous":
                from dask.diagnostics import ProgressBar

                with ProgressBar(minimum=1.0):
                    return list(dask.compute(*tasks, scheduler=sched))
            return list(dask.compute(*tasks, scheduler=sched))
        shared_f = [client.scatter(s, broadcast=True, hash=False) for s in shared]
        futures = [client.submit(func, shared_f[i], *args, pure=False) for i, *args in calls]
        if progress or on_result is not None:
            from distributed import as_completed
            from tqdm.auto import tqdm

            index = {f.key: i for i, f in enumerate(futures)}
            with tqdm(total=len(futures), desc=desc, leave=False, disable=not progress) as bar:
                for fut in as_completed(futures):
                    if on_result is not None:
                        on_result(index[fut.key], fut.result())
                    bar.update(1)
        return client.gather(futures)
