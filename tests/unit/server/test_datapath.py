"""The remote data path: agents write restore points through server sessions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kura.agent.enrol import enrol
from kura.agent.loop import Agent
from kura.agent.remote import RemoteBackend, RemoteSession, open_session
from kura.agent.runner import TaskContext
from kura.agent.testing import FAST, AgentThread, FakeCluster, FakeRunner, wait_for
from kura.errors import RepositoryError, ServerError
from kura.repository import DiskEntry, Manifest, ObjectNotFound, Repository, SourceRef
from kura.repository.index import DiskIndex
from kura.repository.store import index_name
from kura.server import schemas
from kura.server.client import PACK_RECORD, ServerClient
from kura.server.dataport import DataChannel
from kura.server.sessions import Session, SessionManager
from kura.server.testing import RunningServer, start_server

CHUNK = 64 << 10


class RepoRunner(FakeRunner):
    """Backs up a VM's (in-memory) disk through the server with the repository writer."""

    def __init__(self, cluster: FakeCluster, node: str, client: ServerClient,
                 disks: dict[str, bytearray], mode: str = "ok") -> None:
        super().__init__(cluster, node)
        self.client = client
        self.disks = disks
        self.mode = mode
        self.dirty: dict[str, set[int]] = {}
        self.forge: tuple[Manifest, DiskEntry, list[bytes]] | None = None
        self.aborted_indexes_left: list[str] | None = None

    def backup(self, ctx: TaskContext) -> schemas.TaskResult:
        uuid, name = ctx.payload["vm_uuid"], ctx.payload["vm_name"]
        data = self.disks[name]
        sess = open_session(self.client, ctx.task.id)
        repo = sess.repo
        parent = repo.latest(uuid)
        w = repo.begin_snapshot(SourceRef("vm", uuid, name), node=self.node, parent=parent,
                                kind="incremental" if parent else "full")
        if self.mode == "forge" and self.forge is not None:
            # Hand-craft a restore point whose index names another VM's chunks.
            victim, entry, ids = self.forge
            name, sha = repo.store.write_index(w.id, "vda", DiskIndex(entry.size, CHUNK, ids))
            forged = replace(victim, id=w.id, source=SourceRef("vm", uuid, name), parent=None,
                             disks=[replace(entry, index=name, index_sha256=sha)], configs={})
            try:
                repo.store.write_manifest(forged)
            finally:
                w.abort()
            raise AssertionError("the server accepted a forged restore point")
        try:
            base = parent.disk("vda") if parent else None
            dw = w.add_disk("vda", len(data), base=base)
            todo = self.dirty.get(name, set()) if parent else set(range(len(data) // CHUNK))
            for i in sorted(todo):
                dw.write_chunk(i, bytes(data[i * CHUNK:(i + 1) * CHUNK]))
            dw.finish()
            if self.mode == "crash":
                w._session._stop.set()  # a dead process's heartbeat stops with it
                raise RepositoryError("simulated crash before commit")  # no abort, no end
            if self.mode == "abort":  # a clean abort after the indexes were written
                w.abort()
                self.aborted_indexes_left = [n for n in (index_name(w.id, "vda"),)
                                             if repo.store.backend.exists(n)]
                raise RepositoryError("simulated failure, aborted")
            m = w.commit()
        except BaseException:
            if self.mode not in ("crash", "abort"):  # a failed backup aborts its writer
                with contextlib.suppress(Exception):
                    w.abort()
            raise
        sess.end()
        self.dirty[name] = set()
        return schemas.TaskResult(ok=True, snapshot=m.id, kind=m.kind, consistency="crash",
                                  bytes_stored=dw.stats["bytes_stored"])


@pytest.fixture(params=["data-port", "https"])
def setup(tmp_path: Path, request: pytest.FixtureRequest
          ) -> Iterator[tuple[RunningServer, Repository, FakeCluster]]:
    """A server with a repository; chunks go through its data port, or (a server started
    with ``--data-listen off``) through the HTTPS routes."""
    repo = Repository.init(tmp_path / "repo", passphrase=None, encryption="none",
                           chunk_size=CHUNK)
    srv = start_server(tmp_path / "server", dead_after=2.0, repo=repo,
                       data_port=request.param == "data-port")
    yield srv, repo, FakeCluster()
    srv.stop()


def _agent(srv: RunningServer, fc: FakeCluster, node: str, disks: dict[str, bytearray],
           mode: str = "ok") -> tuple[AgentThread, RepoRunner]:
    creds = enrol(srv.url, srv.token("agent", cluster="lab"), node=node)
    runner = RepoRunner(fc, node, creds.client(), disks, mode)
    return AgentThread(Agent(creds.client(), runner, FAST)), runner


def _job_over_all(c: ServerClient) -> None:
    """Job "j" over every VM, without retries, once the inventory has arrived."""
    wait_for(lambda: c.inventory().clusters, what="inventory")
    c.create_job(schemas.JobSpec(name="j", retries=0, selection=schemas.Selection(all=True)))


def _run(c: ServerClient, job: str) -> schemas.RunOut:
    run = c.run_job(job)
    wait_for(lambda: c.run(run.id).status != "running", 30, "run end")
    return c.run(run.id)


def test_incremental_uploads_only_new_chunks_and_restores(
        setup: tuple[RunningServer, Repository, FakeCluster],
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, repo, fc = setup
    vm = fc.add("web1", "node-a")
    disks = {"web1": bytearray(os.urandom(8 * CHUNK))}
    agent, runner = _agent(srv, fc, "node-a", disks)
    uploads: list[bytes] = []  # every chunk upload the server receives, whatever the path
    real_put = SessionManager.put_chunk

    def counting(self: SessionManager, sess: Session, cid: bytes,
                 blob: bytes | memoryview) -> None:
        uploads.append(cid)
        real_put(self, sess, cid, blob)
    monkeypatch.setattr(SessionManager, "put_chunk", counting)
    try:
        with srv.client() as c:
            wait_for(lambda: c.inventory().clusters, what="inventory")
            c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True)))
            assert _run(c, "j").status == "succeeded"
            assert len(uploads) == 8
            disks["web1"][3 * CHUNK:3 * CHUNK + 10] = b"x" * 10
            runner.dirty["web1"] = {3}
            run = _run(c, "j")
            assert run.status == "succeeded"
            assert run.vms[0].result["kind"] == "incremental"
            assert len(uploads) == 9  # one changed chunk sent
            snaps = c.snapshots(vm.uuid)
            assert [s.sequence for s in snaps] == [0, 1]
            # Restore through the server: it picks the node that runs the VM.
            run = c.restore(schemas.RestoreRequest(ref=snaps[-1].id))
            assert run.kind == "restore" and run.vms[0].vm_uuid == vm.uuid
            wait_for(lambda: c.run(run.id).status != "running", 30, "restore")
            done = c.run(run.id)
            assert done.status == "succeeded" and done.vms[0].node == "node-a"
            assert done.vms[0].result["data"]["snapshot"] == snaps[-1].id
        latest = repo.get_snapshot(snaps[-1].id)
        reader = repo.open_disk(latest, "vda")
        assert reader.pread(0, len(disks["web1"])) == bytes(disks["web1"])
    finally:
        agent.kill()


def test_forged_chunk_references_are_refused(
        setup: tuple[RunningServer, Repository, FakeCluster]) -> None:
    srv, repo, fc = setup
    fc.add("web1", "node-a")
    evil = fc.add("evil", "node-b")
    disks = {"web1": bytearray(os.urandom(2 * CHUNK)), "evil": bytearray(2 * CHUNK)}
    good, _ = _agent(srv, fc, "node-a", disks)
    bad, forger = _agent(srv, fc, "node-b", disks, mode="forge")
    try:
        with srv.client() as c:
            wait_for(lambda: sum(len(n.vms) for n in c.inventory().clusters[0].nodes) == 2,
                     what="inventory")
            c.create_job(schemas.JobSpec(name="web", selection=schemas.Selection(names=["web1"])))
            assert _run(c, "web").status == "succeeded"
            # The agent of node-b cannot even read web1's restore points; suppose it
            # learnt web1's chunk ids some other way and names them in its own backup.
            victim = repo.list_snapshots()[0]
            forger.forge = (victim, victim.disks[0], repo.read_index(victim, "vda"))
            c.create_job(schemas.JobSpec(name="evil", retries=0,
                                         selection=schemas.Selection(names=["evil"])))
            run = _run(c, "evil")
            assert run.status == "failed"
            assert "neither uploaded nor inherited" in run.vms[0].diagnosis
            assert c.snapshots(evil.uuid) == []
    finally:
        good.kill()
        bad.kill()


def test_a_backup_that_dies_before_commit_leaves_nothing_and_the_next_succeeds(
        setup: tuple[RunningServer, Repository, FakeCluster]) -> None:
    srv, repo, fc = setup
    vm = fc.add("web1", "node-a")
    disks = {"web1": bytearray(os.urandom(2 * CHUNK))}
    agent, runner = _agent(srv, fc, "node-a", disks, mode="crash")
    try:
        with srv.client() as c:
            _job_over_all(c)
            assert _run(c, "j").status == "failed"
            assert repo.list_snapshots(vm.uuid) == []
            assert srv.ctx.sessions is not None
            wait_for(lambda: not srv.ctx.sessions._sessions, what="session aborted")
            runner.mode = "ok"  # the lock the dead writer took is gone: this succeeds
            assert _run(c, "j").status == "succeeded"
            assert len(repo.list_snapshots(vm.uuid)) == 1
    finally:
        agent.kill()


def test_an_aborting_writer_removes_its_own_indexes_through_the_session(
        setup: tuple[RunningServer, Repository, FakeCluster]) -> None:
    srv, repo, fc = setup
    vm = fc.add("web1", "node-a")
    disks = {"web1": bytearray(os.urandom(2 * CHUNK))}
    agent, runner = _agent(srv, fc, "node-a", disks, mode="abort")
    try:
        with srv.client() as c:
            _job_over_all(c)
            assert _run(c, "j").status == "failed"
        assert runner.aborted_indexes_left == []  # the session allowed the delete
        assert repo.list_snapshots(vm.uuid) == []
    finally:
        agent.kill()


def test_uploads_are_durable_before_the_manifest_even_without_a_sync(
        setup: tuple[RunningServer, Repository, FakeCluster],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server stages uploaded chunks in a write batch; an agent that never asks
    for a sync still gets them committed before its manifest, and an aborted
    session's staged uploads never appear."""
    srv, repo, fc = setup
    vm = fc.add("web1", "node-a")
    disks = {"web1": bytearray(os.urandom(6 * CHUNK))}
    monkeypatch.setattr(RemoteBackend, "sync_dirs", lambda self, names: None)
    mgr = srv.ctx.sessions
    assert mgr is not None

    def no_sync(self: DataChannel) -> None:
        # No SYNC frame (nothing asks the server to commit): only wait until the server
        # has staged the uploads, as a pack upload's answer says over HTTPS (without a
        # SYNC a data port client may race its own uploads: the server then refuses the
        # manifest, which is safe, but not what this test is about).
        wait_for(lambda: any(len(x.uploaded) >= 6 for x in list(mgr._sessions.values())),
                 what="uploads staged")
    monkeypatch.setattr(DataChannel, "sync", no_sync)
    agent, runner = _agent(srv, fc, "node-a", disks, mode="crash")
    backend = repo.store.backend
    try:
        with srv.client() as c:
            _job_over_all(c)
            assert _run(c, "j").status == "failed"
            wait_for(lambda: not mgr._sessions, what="session aborted")
            assert list(backend.list("chunks")) == [] and list(backend.list("tmp")) == []
            runner.mode = "ok"
            assert _run(c, "j").status == "succeeded"
        (m,) = repo.list_snapshots(vm.uuid)
        assert len(list(backend.list("chunks"))) == 6 and list(backend.list("tmp")) == []
        assert repo.open_disk(m, "vda").pread(0, 6 * CHUNK) == bytes(disks["web1"])
    finally:
        agent.kill()


def test_an_agent_cannot_open_a_session_for_a_vm_of_another_cluster(
        setup: tuple[RunningServer, Repository, FakeCluster]) -> None:
    from kura.catalog import Run, RunVm, Task, Vm
    from kura.server.sessions import Refused

    srv, _, fc = setup
    vm = fc.add("web1", "node-a")
    mine, _ = _agent(srv, fc, "node-a", {})
    creds = enrol(srv.url, srv.token("agent", cluster="elsewhere"), node="node-x")
    try:
        with srv.client() as c:
            wait_for(lambda: c.inventory().clusters, what="inventory")
        mgr = srv.ctx.sessions
        assert mgr is not None
        with srv.ctx.catalog.session() as s:
            assert s.get(Vm, vm.uuid) is not None
            run = Run(job_name="forged", spec={})
            s.add(run)
            s.flush()
            rv = RunVm(run_id=run.id, vm_uuid=vm.uuid, vm_name=vm.name)
            s.add(rv)
            s.flush()
            task = Task(agent_id=creds.agent_id, run_vm_id=rv.id, kind="backup", state="sent")
            s.add(task)
            s.flush()
            task_id = task.id
        with pytest.raises(Refused, match="not in this agent's cluster"):
            mgr.begin(creds.agent_id, task_id)
        with pytest.raises(Refused, match="is not this agent's"):
            mgr.begin(creds.agent_id, task_id + 1000)
    finally:
        mine.kill()


def test_chunk_packs_are_checked(tmp_path: Path) -> None:
    from typing import Any, cast

    from kura.errors import UsageError
    from kura.repository.blob import MAGIC
    from kura.server.sessions import Refused, Session, SessionManager

    repo = Repository.init(tmp_path / "repo", passphrase=None, encryption="none",
                           chunk_size=CHUNK)
    mgr = SessionManager(cast(Any, None), repo)
    backend = repo.store.backend
    sess = Session(id="s", agent_id="a", task_id=1, vm_uuid="u", kind="backup", visible=set(),
                   batch=backend.write_batch())
    blob = MAGIC + os.urandom(100)
    good = PACK_RECORD.pack(b"\x01" * 32, len(blob)) + blob
    assert mgr.write_chunks(sess, good + PACK_RECORD.pack(b"\x02" * 32, len(blob)) + blob) == 2
    assert sess.uploaded == {b"\x01" * 32, b"\x02" * 32}
    for bad in (good[:-1], good + b"\x00" * 10, PACK_RECORD.pack(b"\x03" * 32, 0)):
        with pytest.raises(UsageError):
            mgr.write_chunks(sess, bad)
    with pytest.raises(Refused):
        mgr.write_chunks(sess, PACK_RECORD.pack(b"\x04" * 32, 5) + b"HELLO")
    assert sess.batch is not None
    sess.batch.commit()
    assert backend.read("chunks/01/" + "01" * 32) == blob
    restore = Session(id="r", agent_id="a", task_id=2, vm_uuid="u", kind="restore",
                      visible=set())
    with pytest.raises(Refused):
        mgr.write_chunks(restore, good)


def test_remote_batch_sends_packs_and_commits_after_them() -> None:
    from typing import Any, cast

    from kura.agent.remote import RemoteWriteBatch

    class Wire:
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []
            self.fail = False
            self.data = None  # no data port: chunks go in packs

        def write_chunks(self, pack: bytes) -> None:
            if self.fail:
                raise RepositoryError("connection lost")
            self.calls.append(("pack", len(pack)))

        def write(self, name: str, data: bytes, *, sync_dir: bool = True) -> None:
            self.calls.append(("write", name))

        def sync_dirs(self, names: list[str]) -> None:
            self.calls.append(("sync", len(names)))

    wire = Wire()
    batch = RemoteWriteBatch(cast(Any, wire), pack_bytes=250)
    name = "chunks/ab/" + "ab" * 32
    batch.put(name, b"x" * 100)
    assert wire.calls == []
    batch.put(name, b"y" * 100)   # 2 x (36 + 100) >= 250: one pack
    batch.put(name, b"z" * 10)
    batch.put("other/object", b"w")  # not a chunk: written at once
    assert wire.calls == [("pack", 272), ("write", "other/object")]
    batch.commit()
    assert wire.calls[2:] == [("pack", 46), ("sync", 4)]
    wire.fail = True
    with pytest.raises(RepositoryError):
        batch.put(name, b"q" * 300)  # fills a pack at once: its sender sees the failure
    with pytest.raises(RepositoryError):
        batch.commit()  # and so does the commit: nothing claims to be durable



def _open_backup_session(srv: RunningServer, fc: FakeCluster,
                         node: str) -> tuple[ServerClient, RemoteSession]:
    """A real backup session over HTTPS, for a task made by hand (no job)."""
    from kura.catalog import Run, RunVm, Task

    vm = fc.add("web1", node)
    agent, _ = _agent(srv, fc, node, {})
    try:
        with srv.client() as c:
            wait_for(lambda: c.inventory().clusters, what="inventory")
    finally:
        agent.kill()
    creds = enrol(srv.url, srv.token("agent", cluster="lab"), node=node)
    with srv.ctx.catalog.session() as s:
        run = Run(job_name="by-hand", spec={})
        s.add(run)
        s.flush()
        rv = RunVm(run_id=run.id, vm_uuid=vm.uuid, vm_name=vm.name)
        s.add(rv)
        s.flush()
        task = Task(agent_id=creds.agent_id, run_vm_id=rv.id, kind="backup", state="sent")
        s.add(task)
        s.flush()
        task_id = task.id
    client = creds.client()
    return client, open_session(client, task_id)


@pytest.mark.parametrize("setup", ["https"], indirect=True)  # the HTTPS routes
def test_remote_touch_chunks_answers_the_missing_and_remembers_the_present(
        tmp_path: Path, setup: tuple[RunningServer, Repository, FakeCluster],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kura.repository import StoreSink
    from kura.repository.blob import MAGIC
    from kura.repository.store import chunk_name

    srv, repo, fc = setup
    client, rsess = _open_backup_session(srv, fc, "node-a")
    remote = rsess.repo.store.backend
    assert isinstance(remote, RemoteBackend)
    mgr = srv.ctx.sessions
    assert mgr is not None
    sess = mgr._sessions[rsess.session_id]
    stored = [bytes([i]) * 32 for i in range(1, 6)]
    for cid in stored:
        repo.store.backend.write(chunk_name(cid), MAGIC + cid)
        os.utime(tmp_path / "repo" / chunk_name(cid), (1000, 1000))
    absent = [bytes([0xA0 + i]) * 32 for i in range(3)]
    # Another session's upload, staged but not committed, is not present for this one.
    other = repo.store.backend.write_batch()
    other.put(chunk_name(absent[2]), MAGIC + b"staged")
    requests: list[str] = []
    real_do = RemoteBackend._do

    def counting(self: RemoteBackend, name: str, method: str, path: str, **kw: Any) -> Any:
        requests.append(path)
        return real_do(self, name, method, path, **kw)
    monkeypatch.setattr(RemoteBackend, "_do", counting)
    limit = schemas.TOUCH_MAX
    monkeypatch.setattr(schemas, "TOUCH_MAX", 3)  # the agent splits its requests
    asked = [absent[0], *stored, absent[1], absent[2]]
    assert remote.touch_chunks(asked) == set(absent)
    assert requests == ["/chunks/touch"] * 3
    # Only what exists becomes a chunk the manifest may name; never a missing one.
    assert sess.present == set(stored)
    for cid in stored:  # touched: the GC mark
        assert (tmp_path / "repo" / chunk_name(cid)).stat().st_mtime > 1000
    other.discard()
    # The writer's sink uses it for has_many: one request, not one per chunk.
    requests.clear()
    assert StoreSink(rsess.repo.store).has_many(stored[:2] + absent[:1]) == {absent[0]}
    assert requests == ["/chunks/touch"]
    # Malformed input is refused before anything is touched; other agents are refused.
    path = f"/api/agent/sessions/{rsess.session_id}/chunks/touch"
    for body in ({"ids": ["zz" * 32]}, {"ids": ["ab" * 31]}, {"ids": ["AB" * 32]},
                 {"ids": ["ab" * 32] * (limit + 1)}, {"ids": "ab" * 32},
                 {"ids": [], "more": 1}, {"names": []}):
        with pytest.raises(ServerError) as exc:
            client.request("POST", path, json=body)
        assert getattr(exc.value, "status", 0) == 422, body
    stranger = enrol(srv.url, srv.token("agent", cluster="lab"), node="node-z").client()
    with pytest.raises(ServerError) as exc:
        stranger.request("POST", path, json={"ids": [stored[0].hex()]})
    assert getattr(exc.value, "status", 0) == 403
    assert client.request("POST", path, json={"ids": []}) == {"ids": []}
    # A server older than the route (404): the agent falls back to single touches.
    sess.present.clear()

    def old_server(self: RemoteBackend, name: str, method: str, path: str, **kw: Any) -> Any:
        requests.append(path)
        if path == "/chunks/touch":
            raise ObjectNotFound(name, self.location)
        return real_do(self, name, method, path, **kw)
    monkeypatch.setattr(RemoteBackend, "_do", old_server)
    requests.clear()
    assert remote.touch_chunks(asked) == set(absent)
    assert requests == ["/chunks/touch"] + ["/touch"] * len(asked)  # asks only once
    assert sess.present == set(stored)
    rsess.abort_quietly()


@pytest.mark.parametrize("setup", ["https"], indirect=True)  # the HTTPS routes
def test_an_incremental_touches_its_inherited_chunks_in_batches(
        tmp_path: Path, setup: tuple[RunningServer, Repository, FakeCluster],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kura.repository import writer
    from kura.repository.store import chunk_name

    srv, repo, fc = setup
    vm = fc.add("web1", "node-a")
    n = 40
    disks = {"web1": bytearray(os.urandom(n * CHUNK))}
    agent, runner = _agent(srv, fc, "node-a", disks)
    requests: list[str] = []
    real_do = RemoteBackend._do

    def counting(self: RemoteBackend, name: str, method: str, path: str, **kw: Any) -> Any:
        requests.append(path)
        return real_do(self, name, method, path, **kw)
    monkeypatch.setattr(RemoteBackend, "_do", counting)
    monkeypatch.setattr(writer, "TOUCH_BATCH", 16)
    try:
        with srv.client() as c:
            _job_over_all(c)
            assert _run(c, "j").status == "succeeded"
            # The full backup asks once per chunk (the writer's per-chunk check).
            assert requests.count("/touch") == n and "/chunks/touch" not in requests
            requests.clear()
            disks["web1"][3 * CHUNK:3 * CHUNK + 10] = b"x" * 10
            runner.dirty["web1"] = {3}
            run = _run(c, "j")
            assert run.status == "succeeded" and run.vms[0].result["kind"] == "incremental"
            # One touch for the changed chunk; the 39 inherited ones in 3 batches
            # (before: 39 more single touches).
            assert requests.count("/touch") == 1
            assert requests.count("/chunks/touch") == 3
            snaps = repo.list_snapshots(vm.uuid)
            assert len(snaps) == 2
            assert repo.open_disk(snaps[-1], "vda").pread(0, n * CHUNK) == bytes(disks["web1"])
            # An inherited chunk that vanished fails the next incremental, as locally.
            gone = repo.read_index(snaps[-1], "vda")[7]
            (tmp_path / "repo" / chunk_name(gone)).unlink()
            run = _run(c, "j")
            assert run.status == "failed"
            assert "missing from the repository" in run.vms[0].diagnosis
            assert gone.hex() in run.vms[0].diagnosis
            assert len(repo.list_snapshots(vm.uuid)) == 2
    finally:
        agent.kill()


@pytest.mark.parametrize("setup", ["data-port"], indirect=True)
def test_an_agent_that_cannot_reach_the_data_port_uses_https(
        setup: tuple[RunningServer, Repository, FakeCluster],
        caplog: pytest.LogCaptureFixture) -> None:
    from kura.server.testing import free_port

    srv, _, fc = setup
    srv.ctx.data_port = free_port()  # as if a firewall dropped it
    _, rsess = _open_backup_session(srv, fc, "node-a")
    backend = rsess.repo.store.backend
    assert isinstance(backend, RemoteBackend) and backend.data is None
    assert "chunks go over HTTPS instead" in caplog.text
    assert backend.touch_chunks([b"\x01" * 32]) == {b"\x01" * 32}
    rsess.abort_quietly()
