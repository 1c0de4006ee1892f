"""Ray children, the local side: one child of kind ``"ray"`` per remote spec, and the connection.

The only module (with ``_ray_actor`` on the remote side) that imports ``ray``, and only when a
tree holds a Ray spec. Ray places and runs the actor; otree decides everything else: the
actor is created with ``max_restarts=0`` and ``max_task_retries=0``, so every death reaches
the local supervisor as this child's ``error`` exit, and the supervisor restarts, counts and
backs off exactly as for a local child.

Locally the child is a task that traps stops: a stop asks the remote tree to stop (its own
graces apply there) and waits for it under this child's ``shutdown`` grace; when the grace
runs out, or for ``brutal_kill``, the actor is killed (``ray.kill``). All Ray waits go
through ``ObjectRef.future()`` and the trio token: no thread per call.

While a run is ready, its ``RemoteRun`` is the child's ``RunningChild.remote``: what the
local side shows of the remote tree (its status, as the actor last sent it) and the way
requests reach into it (``_ray_handles``). With ``spare=True`` each run also makes the actor
the next run takes over (``_Spares``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import trio

from . import _errors
from ._errors import NotRunning, Shutdown, SpecError, StartError
from ._info import ChildInfo, StatusNode
from ._loader import MODULE_PREFIX
from ._ray_actor import Batch, Host, Reply
from ._rayguard import RayGuard
from ._spec import ChildSpec, PoolSpec, ProcessSpec, RaySpec, SupervisorSpec
from ._task import current_child

if TYPE_CHECKING:
    from ._supervisor import Tree

# Publishes an event on the local bus: (path, kind, reason, **details).
Emit = Callable[..., None]

__all__ = [
    "INSTALL",
    "RemoteError",
    "RemoteRun",
    "check_options",
    "check_picklable",
    "contains_ray",
    "ray_session",
    "run_ray",
]

INSTALL = "pip install 'trio-otree[ray]'"
ADDRESS_ENV = "OTREE_RAY_ADDRESS"
LOCAL = "local"  # the address of a local instance started for the tree (N nodes: local:N)
_MAX_LOCAL_NODES = 16

# Per kind of Ray call: what otree forces (a tree may give only that value: otree restarts and
# retries, Ray never does), why, and what otree sets itself.
_FORCED: dict[str, tuple[dict[str, object], str]] = {
    "actor": ({"max_restarts": 0, "max_task_retries": 0}, "otree restarts Ray children, Ray never does"),
    "task": ({"max_retries": 0, "retry_exceptions": False}, "otree retries jobs, Ray never does"),
}
_RESERVED = {
    "actor": ("concurrency_groups", "max_concurrency", "name", "namespace", "get_if_exists"),
    "task": ("num_returns", "_generator_backpressure_num_objects", "_num_objects_per_yield"),
}
# The actor's run() holds one thread; ready, ping, stop and control need their own while it runs,
# and the events' long poll one apart: Ray runs a caller's calls in one group in order, so a ping
# or a request queued behind a poll would wait out its second (measured: 0.76 s per request).
_GROUPS = {"run": 1, "ctl": 4, "events": 1}
# Ray's messages span lines and carry ids; an exit detail keeps one line of at most this.
_DETAIL_CHARS = 600
_EVENT_POLL_SECONDS = 1.0  # how long one fetch of remote events waits for one on the actor
_LAST_EVENTS_SECONDS = 2.0  # for the last remote events once the remote tree has stopped
_PROBE_SECONDS = 5.0  # for a TCP connection to the head before Ray is asked to join it
_NODE_DIED = "because its node has died"  # Ray's words in an ActorDiedError when the node went (Ray 2.60)
_GCS_PATIENCE_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"  # the seconds Ray's driver lives without the GCS
_GCS_PATIENCE_SECONDS = 10 * 365 * 24 * 3600  # otree's: ten years
SPARE_LINGER = 30.0  # seconds a spare waits for its child's next run once a run has ended


class RemoteError(Exception):
    """A Ray child ended in ``error``: the remote child's own error exit, or the actor's death.

    ``exit_detail`` is the exit's detail: the remote child's (``exit code 3``,
    ``ValueError: bad``...) or Ray's cause (``ActorDiedError: ...``, ``heartbeat: ...``).
    """

    def __init__(self, exit_detail: str) -> None:
        self.exit_detail = exit_detail
        super().__init__(exit_detail)


def import_ray(path: str) -> ModuleType:
    """The ``ray`` module, or one ``SpecError`` line saying what to install.

    Imported by name, untyped: otree type-checks the same with or without the extra.
    """
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise SpecError(path, "otree.ray", f"needs Ray ({INSTALL})", "ray not installed") from None


def check_options(path: str, options: object, kind: Literal["actor", "task"] = "actor") -> None:
    """Refuse what Ray would refuse, and what otree sets itself, when the spec is built: options of
    an actor (``otree.ray``) or of a task (``otree.RayExecutor``)."""
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise SpecError(path, "ray options", "must be keyword arguments", options)
    import_ray(path)
    option_utils = importlib.import_module("ray._common.ray_option_utils")
    known = getattr(option_utils, f"{kind}_options")
    forced, why = _FORCED[kind]
    for key, value in options.items():
        if key in forced and value != forced[key]:
            raise SpecError(path, key, f"must be {forced[key]}: {why}", value)
        if key in _RESERVED[kind]:
            raise SpecError(path, key, "is set by otree; leave it out", value)
        if key == "lifetime" and value not in (None, "non_detached"):
            raise SpecError(path, "lifetime", "must be non-detached: Ray children die with the tree", value)
        if key not in known:
            raise SpecError(path, key, f"is not a Ray {kind} option", value)
    try:
        # an actor's are checked as .options() (otree sets its concurrency groups), a task's as @ray.remote
        getattr(option_utils, f"validate_{kind}_options")(dict(options), in_options=kind == "actor")
    except (ValueError, TypeError) as error:
        raise SpecError(path, "ray options", f"are refused by Ray ({error})", options) from None


# Ray's worker SIGKILLs its own children as it exits (killed by ``ray.kill``, its owner's death or
# its raylet's): the spawn helper among them, whose last act, killing every group it listed (an
# agent's tools), would then never happen. otree's helper does that work, whole groups included.
_WORKER_KEEPS_CHILDREN = ("RAY_kill_child_processes_on_worker_exit", "false")


def actor_options(spec: RaySpec, *, embedded: bool) -> dict[str, Any]:
    """The Ray options of ``spec``'s actors. Where the wrapped spec holds process children and the
    instance is not otree's own (whose workers inherit the switch from otree's environment), the
    actor's ``runtime_env`` turns Ray's kill of the worker's children off (Ray then starts a worker
    for it through its runtime-env agent: ~0.3 s more per actor, measured)."""
    if embedded or not _holds_processes(spec.spec):
        return spec.options
    name, value = _WORKER_KEEPS_CHILDREN
    runtime_env = dict(spec.options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), name: value}
    return {**spec.options, "runtime_env": runtime_env}


def _holds_processes(spec: ChildSpec) -> bool:
    """Whether otree would spawn processes for ``spec``: a process child, a pool's process jobs."""
    from ._pool import ProcessJob  # not at import: _pool -> _spec -> here

    if isinstance(spec, ProcessSpec):
        return True
    if isinstance(spec, PoolSpec):
        return any(isinstance(handler, ProcessJob) for handler in spec.handlers.values())
    return isinstance(spec, SupervisorSpec) and any(_holds_processes(child) for child in spec.children)


def check_picklable(path: str, spec: ChildSpec) -> None:
    """Refuse a spec that cannot travel to a Ray node (a lock, a socket, a generator in it)."""
    try:
        import_ray(path).cloudpickle.dumps(spec)
    except Exception as error:  # noqa: BLE001 - whatever pickling raises, the spec cannot travel
        raise SpecError(path, "spec", "must be picklable to run on a Ray node", _one_line(error)) from None


def contains_ray(spec: ChildSpec) -> bool:
    """Whether ``spec`` is or holds a Ray spec or a pool whose jobs run on Ray (so the tree needs a
    Ray connection)."""
    if isinstance(spec, RaySpec) or (isinstance(spec, PoolSpec) and spec.executor is not None):
        return True
    return isinstance(spec, SupervisorSpec) and any(contains_ray(child) for child in spec.children)


class _Session:
    """This process's connection to Ray, and whether otree started the instance itself."""

    embedded = False
    _cluster: Any = None  # a local cluster of several nodes (``local:N``), shut down with the tree
    _guard: RayGuard  # kills what is left of the embedded instance when otree ends

    def connect(self, ray: ModuleType) -> None:
        """Connect to Ray once: ``$OTREE_RAY_ADDRESS`` (``--ray``), or else start a local instance
        for the tree (the embedded default; ``local:N``: N nodes on this machine, each a raylet of
        its own, as Ray's multi-node tests run), loopback only and without usage stats or
        dashboard, shut down with the tree. A Ray the host program already joined is used as it is."""
        if ray.is_initialized():
            return
        address = os.environ.get(ADDRESS_ENV) or LOCAL
        nodes = _local_nodes(address)
        # Ray ends the process of a driver that cannot reach the GCS for this long (60 s by
        # default), and otree is the driver: a head that restarts, or an embedded GCS that dies,
        # must not end the supervisor. Read by ray.init; an embedded instance inherits it.
        os.environ[_GCS_PATIENCE_ENV] = str(_GCS_PATIENCE_SECONDS)
        if nodes is None:
            _probe(address)
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return
        # an instance for this tree alone listens on loopback only: Ray reads the switch when it
        # is imported (a tree file imported it already), so its constant is set too (Ray 2.60)
        if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        switch, off = _WORKER_KEEPS_CHILDREN
        os.environ[switch] = off  # every worker of the instance inherits it
        guard = RayGuard()
        # a new local instance has token authentication on (Ray's default), and Ray says so on
        # otree's stderr at every start: a warning about nothing to do
        quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with guard.holding_what_starts():
                self._start_local(ray, nodes)
        except BaseException:
            self._cluster = None
            guard.close()  # whatever of the instance had started goes with the failed start
            raise
        finally:
            quiet.setLevel(level)
        self.embedded = True
        self._guard = guard

    def _start_local(self, ray: ModuleType, nodes: int) -> None:
        if nodes == 1:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            return
        from ray.cluster_utils import Cluster

        self._cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False})
        for _ in range(nodes - 1):
            self._cluster.add_node()
        self._cluster.wait_for_nodes()
        ray.init(address=self._cluster.address, log_to_driver=False, configure_logging=False)

    def shutdown_embedded(self) -> None:
        if self.embedded:
            self.embedded = False
            try:
                import_ray("<ray>").shutdown()
                if self._cluster is not None:
                    self._cluster.shutdown()
                    self._cluster = None
            finally:  # whatever a failed shutdown left running goes too
                self._guard.close()


def _local_nodes(address: str) -> int | None:
    """How many nodes a local instance for the tree has (``local``: 1, ``local:N``: N), or None for
    the address of a cluster to join.

    Raises:
      ConnectionError: ``local:`` followed by anything but a number of nodes from 1 to 16.
    """
    if address == LOCAL:
        return 1
    if not address.startswith(LOCAL + ":"):
        return None
    count = address[len(LOCAL) + 1 :]
    if not count.isdigit() or not 1 <= int(count) <= _MAX_LOCAL_NODES:
        raise ConnectionError(
            f"{address!r}: 'local:N' needs N, a number of nodes from 1 to {_MAX_LOCAL_NODES}"
        )
    return int(count)


_SESSION = _Session()


def _probe(address: str) -> None:
    """Fail at once on an address nobody serves (``ray.init`` would wait minutes for it).

    Raises:
      ConnectionError: ``ray://`` (Ray Client is not supported), a malformed address, or no
        answer at HOST:PORT within a few seconds.
    """
    if address == "auto":
        return  # Ray finds the local head itself, and says at once when there is none
    if "://" in address:
        raise ConnectionError(f"{address!r}: give the head's GCS address HOST:PORT or 'auto' (not a URL)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"{address!r} is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_SECONDS).close()
    except OSError as error:
        raise ConnectionError(f"no Ray head answers at {address} ({error.strerror or error})") from None


@contextmanager
def ray_session(spec: SupervisorSpec) -> Iterator[None]:
    """Around a tree's run: connect to Ray before it starts if it holds a Ray spec, and shut an
    embedded instance down after it has stopped.

    Raises:
      StartError: Ray cannot be reached (the address and Ray's reason in one line).
    """
    if contains_ray(spec):
        ray = import_ray(spec.id)
        try:
            _SESSION.connect(ray)
        except Exception as error:
            where = os.environ.get(ADDRESS_ENV) or "a local instance"
            raise StartError(spec.id, f"cannot connect to Ray at {where}: {_one_line(error)}") from error
    try:
        yield
    finally:
        _SESSION.shutdown_embedded()


def _one_line(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


async def aref(ref: Any) -> Any:
    """``await`` a Ray ``ObjectRef`` from trio: its result, or Ray's exception.

    The future is completed on Ray's core-worker thread, which wakes this task through the
    trio token. Cancelling the wait does not cancel the remote call: callers stop actors
    themselves (``stop``, then ``ray.kill``).
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    future = ref.future()

    def wake(_: object) -> None:
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


def _remote_root(path: str, spec: RaySpec) -> SupervisorSpec:
    """The tree the actor runs: the wrapped spec alone, run once (never restarted there: the
    local supervisor restarts the whole actor), its exit ending the remote tree."""
    inner = spec.spec
    changes: dict[str, Any] = {
        "restart": "on_demand",
        "significant": True,
        "on_exit": None,
        "autostart": True,
    }
    if isinstance(inner, ProcessSpec):
        changes |= {"restart_exit_codes": (), "no_restart_exit_codes": ()}
    parent = path.rpartition("/")[0]
    return SupervisorSpec(
        id=parent.replace("/", ".") or "ray",
        children=(msgspec.structs.replace(inner, **changes),),
        auto_shutdown="any_significant",
    )


def _send_tree_files_by_value(ray: ModuleType) -> None:
    """Tree files are imported under names no Ray worker can import: their code travels with
    the spec instead (every other module must be importable on the nodes)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(MODULE_PREFIX) and module is not None:
            ray.cloudpickle.register_pickle_by_value(module)


@functools.cache
def _host_class(ray: ModuleType) -> Any:
    """``Host`` as a threaded Ray actor class (made once: Ray exports it once per job)."""
    return ray.remote(concurrency_groups=_GROUPS)(Host)


async def run_ray(spec: RaySpec, tree: Tree, *, task_status: trio.TaskStatus[None]) -> None:
    """One run of a Ray child: place the actor (or take the child's spare), wait until the remote
    child is ready, then until it exits, mapping its exit (or the actor's death) onto this
    child's exit. Pools in it are durable (under the state dir, on the node) when the tree's are."""
    me = current_child()
    stopping = me.stopping  # trapping: a stop is a graceful remote stop under this child's grace
    ray = import_ray(me.path)
    _SESSION.connect(ray)
    options = actor_options(spec, embedded=_SESSION.embedded)
    actor = _host_class(ray).options(**options, max_restarts=0, max_task_retries=0)
    _send_tree_files_by_value(ray)
    root = _remote_root(me.path, spec)
    work = (root, os.fspath(tree.state_dir), tree.durable)
    remote_path = f"{root.id}/{spec.spec.id}"
    claimed = _SPARES.claim(ray, me.child)
    run = RemoteRun(ray, claimed or actor.remote(), me.path, remote_path, me.owner._emit)
    spare = _Spare(actor) if spec.spare else None  # made now, after it: it comes up while this run starts
    suspect: str | None = None  # the node this run's actor was on, if the way it died puts it in doubt
    try:
        try:
            outcome = await run.serve(spec, work, stopping, task_status)
        except ray.exceptions.RayError:
            if claimed is None or run.node_id is not None:
                raise
            ray.kill(run.handle)  # the spare died before it took the run over: start afresh, once
            run = RemoteRun(ray, actor.remote(), me.path, remote_path, me.owner._emit)
            outcome = await run.serve(spec, work, stopping, task_status)
    except ray.exceptions.RayError as error:
        if run.hung or isinstance(error, ray.exceptions.ActorUnavailableError) or _NODE_DIED in str(error):
            suspect = run.node_id
        if run.hung:
            raise RemoteError(run.hung) from error
        raise RemoteError(_one_line(getattr(error, "cause", None) or error)) from error
    finally:
        me.remote = None  # handles and status no longer reach this run
        ray.kill(run.handle)  # the remote tree has stopped, or never will (presumed dead): it goes
        if spare is not None:  # for the next run; none follows a stop by the supervisor
            _SPARES.park(ray, me.child, spare, None if stopping.is_set() else tree.services, suspect)
    if outcome["cost"]:
        me.report_cost(outcome["cost"])  # in this child's exit event, once: the remote run's total
    _exit_as(outcome, stopped=stopping.is_set())


class _Spare:
    """A warm replacement actor for a Ray child's next run (``otree.ray(..., spare=True)``): made
    with the child's options, so Ray places it as it would place the replacement."""

    __slots__ = ("handle", "suspect", "warm")

    def __init__(self, actor: Any) -> None:
        self.handle = actor.remote()
        self.warm = self.handle.where.options(concurrency_group="ctl").remote()  # done once it is up
        self.suspect: str | None = None  # the node of the run it was to replace, if in doubt


class _Spares:
    """Spares parked between runs, by the supervisor's record of their child. A spare not claimed
    within ``SPARE_LINGER`` s (no restart came), or when the tree stops, is killed."""

    def __init__(self) -> None:
        self._parked: dict[object, _Spare] = {}

    def claim(self, ray: ModuleType, child: object) -> Any:
        """The parked spare of ``child`` if it can take the next run, else None (it is killed).

        One that is up is taken unless it is on the node the last run's actor died with; one
        still coming up is further along than a new actor, so it is taken too, unless the
        last run's node is in doubt (it may be there).
        """
        spare = self._parked.pop(child, None)
        if spare is None:
            return None
        up, _ = ray.wait([spare.warm], timeout=0)
        node = None
        if up:
            with suppress(ray.exceptions.RayError):
                node = ray.get(spare.warm)["node_id"]
        if (node is not None and node != spare.suspect) or (not up and spare.suspect is None):
            return spare.handle
        ray.kill(spare.handle)
        return None

    def park(
        self,
        ray: ModuleType,
        child: object,
        spare: _Spare,
        services: trio.Nursery | None,
        suspect: str | None,
    ) -> None:
        """Keep ``spare`` for ``child``'s next run (or kill it: no ``services``, no next run)."""
        if services is None:
            ray.kill(spare.handle)
            return
        spare.suspect = suspect
        self._parked[child] = spare
        services.start_soon(self._expire, ray, child, spare)

    async def _expire(self, ray: ModuleType, child: object, spare: _Spare) -> None:
        try:
            await trio.sleep(SPARE_LINGER)
        finally:  # also when the tree stops (its services are cancelled)
            if self._parked.get(child) is spare:
                del self._parked[child]
                ray.kill(spare.handle)


_SPARES = _Spares()


class RemoteRun:
    """The actor of one run, watched from here: its start, its heartbeat, a stop passed on, the
    remote tree's events forwarded to the local bus and its status kept, under local paths, and
    requests carried into it (``call``). While the child runs, its ``RunningChild.remote``."""

    def __init__(self, ray: ModuleType, handle: Any, path: str, remote_path: str, emit: Emit) -> None:
        self.ray = ray
        self.handle = handle
        self.hung = ""  # why the heartbeat gave the actor up, once it has
        self._path = path  # this child's local path
        self._remote = remote_path  # the wrapped child's path in the remote tree
        self._emit = emit
        self._watching = trio.CancelScope()  # the heartbeat and the stop, once ready
        self._ended = False  # the remote run has ended: the forwarder stops polling
        self._node: str | None = None  # the address of the node the actor runs on
        self._pid: int | None = None  # the actor's process there
        self.node_id: str | None = None  # Ray's id of that node, once the actor has said where it is
        self._version = 0  # of the status snapshot held
        self.snapshot: StatusNode | None = None  # the wrapped child's status, under local paths

    # --- what the local side shows of the remote run -----------------------------------------

    def where(self) -> tuple[int | None, str | None, str | None]:
        """The pid (a wrapped process's own, else the actor's), node and ``STATUS=`` text for the
        Ray child's own line."""
        info = self.snapshot.info if self.snapshot is not None else None
        if info is None:
            return self._pid, self._node, None
        return info.pid or self._pid, self._node, info.status

    def status_node(self, info: ChildInfo) -> StatusNode:
        """The Ray child's status line ``info`` with the remote sub-tree below it."""
        remote = self.snapshot
        if remote is None:
            return StatusNode(info)
        return msgspec.structs.replace(remote, info=info)

    def _local(self, path: str) -> str:
        return self._path + path[len(self._remote) :]

    def _local_text(self, text: str) -> str:
        return text.replace(self._remote, self._path) if self._remote != self._path else text

    def _rehome(self, node: StatusNode) -> StatusNode:
        """A remote status node under local paths, each line naming the node it runs on."""
        info = msgspec.structs.replace(node.info, path=self._local(node.info.path), node=self._node)
        return msgspec.structs.replace(node, info=info, children=[self._rehome(c) for c in node.children])

    def rehome_info(self, info: ChildInfo) -> ChildInfo:
        return msgspec.structs.replace(info, path=self._local(info.path), node=self._node)

    async def call(
        self, op: str, rest: tuple[str, ...], args: tuple[Any, ...], cause: tuple[str, dict[str, Any]]
    ) -> Any:
        """Carry out ``op`` on the supervisor or pool ``rest`` below the wrapped child, on the
        actor; its result, or its error raised here as itself (under local paths). ``cause``:
        the child it is about and what its events there carry (see ``Host.control``).

        Raises:
          NotRunning: the actor is gone (the run is ending: its exit says why).
          OtreeError, ValueError, TypeError: what the remote tree refused.
        """
        ids = (self._remote.rpartition("/")[2], *rest)
        try:
            reply: Reply = await aref(self._ctl("control", op, ids, args, cause))
        except self.ray.exceptions.RayError:
            raise NotRunning(self._path, "stopped") from None
        ok, value = reply
        if ok:
            return value
        name, attrs, message = value
        cls: type[Exception] = {"ValueError": ValueError, "TypeError": TypeError}.get(name) or getattr(
            _errors, name
        )
        error = cls.__new__(cls)
        Exception.__init__(error, self._local_text(message))
        error.__dict__.update({k: self._local_text(v) if isinstance(v, str) else v for k, v in attrs.items()})
        raise error

    def _ctl(self, method: str, *args: Any, group: str = "ctl") -> Any:
        return getattr(self.handle, method).options(concurrency_group=group).remote(*args)

    async def serve(
        self,
        spec: RaySpec,
        work: tuple[SupervisorSpec, str, bool],
        stopping: trio.Event,
        task_status: trio.TaskStatus[None],
    ) -> dict[str, Any]:
        """Start the remote run, report ready when it is, and return how it ended; the remote
        events are forwarded meanwhile, the last ones included.

        Raises:
          RemoteError: not ready within ``start_timeout``.
          ray.exceptions.RayError: the actor died (or was killed by the heartbeat: ``hung``).
        """
        run_ref = self.handle.run.options(concurrency_group="run").remote(*work)
        with trio.move_on_after(spec.start_timeout) as timer:
            ready, where, batch = await aref(self._ctl("ready"))
        if timer.cancelled_caught:
            raise RemoteError(
                f"start_timeout: not ready within {spec.start_timeout:g}s"
                " (Ray could not place the actor, or the remote child did not start)"
            )
        self._emit(self._path, "ray.placed", "", **where)
        self._node, self._pid, self.node_id = where["node"], where["pid"], where["node_id"]
        self._publish(batch)
        if not ready:
            outcome: dict[str, Any] = await aref(run_ref)  # the failed start's exit
            return outcome
        current_child().remote = self
        task_status.started()
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward)
            nursery.start_soon(self._watch, spec.heartbeat, stopping)
            try:
                outcome = await aref(run_ref)
            except self.ray.exceptions.RayError as exc:  # raised alone below, not in a group
                error = exc
                nursery.cancel_scope.cancel()
            self._watching.cancel()
            self._ended = True  # the forwarder ends after its fetch in flight: none is lost
        if error is not None:
            raise error
        with trio.move_on_after(_LAST_EVENTS_SECONDS):
            # what the stopped tree said last
            self._publish(await aref(self._ctl("events", 0.0, self._version, group="events")))
        return outcome

    async def _watch(self, beat: tuple[float, int], stopping: trio.Event) -> None:
        with self._watching:
            async with trio.open_nursery() as watchers:
                watchers.start_soon(self._heartbeat, beat)
                watchers.start_soon(self._stop_on_request, stopping)

    async def _forward(self) -> None:
        with suppress(self.ray.exceptions.RayError):  # the actor died: its run says how
            while not self._ended:
                self._publish(
                    await aref(self._ctl("events", _EVENT_POLL_SECONDS, self._version, group="events"))
                )

    def _publish(self, batch: Batch) -> None:
        """Publish remote events on the local bus under local paths, and keep the remote status.

        The remote root's own events and the wrapped child's ``child.*`` events are left out:
        this child's supervisor reports the child's start, readiness and exit itself.
        """
        taken, dropped, snapshot = batch
        if snapshot is not None:
            self._version = snapshot[0]
            self.snapshot = self._rehome(msgspec.msgpack.decode(snapshot[1], type=StatusNode))
        remote, kept = self._remote, self._path
        for path, kind, reason, details in taken:
            if not (path == remote or path.startswith(remote + "/")):
                continue  # the remote root's
            if path == remote and kind.startswith("child."):
                continue
            extra = {"dropped": dropped} if dropped else {}
            dropped = 0
            self._emit(kept + path[len(remote) :], kind, reason, **details, **extra)

    async def _stop_on_request(self, stopping: trio.Event) -> None:
        await stopping.wait()
        self._ctl("stop")

    async def _heartbeat(self, beat: tuple[float, int]) -> None:
        """Ping the actor's trio loop every ``beat[0]`` s; ``beat[1]`` misses in a row: presumed
        dead and killed (its ``run`` then fails with ``ActorDiedError``, read with ``hung``)."""
        seconds, misses = beat
        missed = 0
        due = trio.current_time()
        while missed < misses:
            due += seconds
            await trio.sleep_until(due)  # a ping that went unanswered took its whole interval
            answered = False
            with trio.move_on_at(due + seconds):
                try:
                    answered = await aref(self._ctl("ping", seconds))
                except self.ray.exceptions.RayError:
                    return  # the actor is gone: its run says how
            missed = 0 if answered else missed + 1
        self.hung = f"heartbeat: no answer to {misses} pings {seconds:g}s apart (presumed dead)"
        self.ray.kill(self.handle)


def _exit_as(outcome: dict[str, Any], *, stopped: bool) -> None:
    """End this run as the remote child's run ended (``outcome`` from ``Host.run``)."""
    reason, detail = outcome["reason"], outcome["detail"]
    if reason == "error":
        raise RemoteError(detail)
    if reason == "shutdown" and not stopped:
        raise Shutdown(detail)
    # normal, or the stop this child asked for: returning makes it normal / shutdown here too
