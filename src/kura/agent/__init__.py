"""The kura agent: one per KVM node; runs what the server dispatches, with the node engine.

- ``enrol``          one-time token → this node's credential, CA pinning, saved state;
- ``loop``           the agent process: heartbeats, inventory, task long-poll, workers,
                     reconnection with backoff;
- ``runner``         the seam between the loop and the node engine (:class:`Runner`,
                     :class:`TaskContext`);
- ``engine_runner``  the real runner: every call into ``kura.engine``/``kura.hypervisor``;
- ``remote``         a repository whose backend is a server data-path session;
- ``testing``        a scripted fake cluster and runner for tests.
"""
