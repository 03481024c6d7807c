"""The fault matrix's machinery (tests/faults, docs/faults.md): origins standing in for the
user's remote, rows (one task each) and the Matrix of a module's tasks and operators, with
the checks that nothing of a task is left."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
from pathlib import Path

import kubernetes
import psutil

from reactor.infra.ports import port_is_free
from reactor.infra.processes import find_marked_processes
from reactor.infra.servers import find_opencode_binary
from reactor.infra.worktrees import safe_component
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.operator_process import OperatorProcess
from reactor_dev.testing.repos import BUGGY_CALC, TEST_CALC, git, make_repo
from reactor_dev.testing.scripted_model import ScriptedModel
from reactor_dev.testing.tasks import TERMINAL, agent_task


class Origin:
    """A bare repository standing in for the user's remote. ``pushes()`` lists what it
    received (a post-receive hook logs every ref update); ``hold()`` makes the next push
    wait in its pre-receive hook until ``release()`` (a push in flight, Pushing held);
    ``refuse()`` makes its pre-receive hook decline every push."""

    def __init__(self, root: Path, name: str):
        work = make_repo(root / f"{name}-work", {"calc.py": BUGGY_CALC, "test_calc.py": TEST_CALC})
        self.path = root / f"{name}.git"
        git(root, "clone", "--quiet", "--bare", str(work), str(self.path))
        self.url = f"file://{self.path}"
        self.main = git(self.path, "rev-parse", "refs/heads/main")
        self.log = self.path / "pushes.log"
        self.log.touch()
        self._hook("post-receive", f'while read old new ref; do echo "$ref $new" >> "{self.log}"; done\n')
        self._hook("pre-receive", textwrap.dedent(f"""\
            if [ -e "{self.path}/refuse" ]; then
                echo "push refused by the repository's policy" >&2
                exit 1
            fi
            if [ -e "{self.path}/hold" ]; then
                touch "{self.path}/push-arrived"
                while [ ! -e "{self.path}/release" ]; do sleep 0.05; done
            fi
            cat >/dev/null
            """))

    def _hook(self, name: str, body: str) -> None:
        hook = self.path / "hooks" / name
        hook.write_text("#!/bin/sh\n" + body)
        hook.chmod(hook.stat().st_mode | stat.S_IXUSR)

    def refuse(self) -> None:
        (self.path / "refuse").touch()

    def hold(self) -> None:
        (self.path / "hold").touch()

    def release(self) -> None:
        (self.path / "release").touch()

    def push_arrived(self) -> bool:
        return (self.path / "push-arrived").exists()

    def pushes(self, branch: str) -> list[str]:
        """Commits pushed to ``branch``, in order."""
        ref = f"refs/heads/{branch}"
        return [line.split()[1] for line in self.log.read_text().splitlines() if line.split()[0] == ref]

    def head(self, branch: str) -> str:
        return git(self.path, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}") if self.has(branch) else ""

    def has(self, branch: str) -> bool:
        return subprocess.run(["git", "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"],
                              cwd=self.path).returncode == 0


class Row:
    """One task of the matrix: its manifest, its origin, and what was seen of it."""

    def __init__(self, name: str, origin: Origin, spec: dict):
        self.name, self.origin, self.spec = name, origin, spec
        self.uid: str | None = None
        self.ports: set[int] = set()
        self.final: dict | None = None

    @property
    def branch(self) -> str:
        return self.spec.get("resultBranch") or f"reactor/{self.name}"

    def manifest(self) -> dict:
        return agent_task(self.name, **self.spec)

    def see(self, obj: dict | None) -> dict | None:
        """Remember what a poll showed (uid, the ports its cells were given)."""
        if obj:
            self.uid = obj["metadata"]["uid"]
            port = ((obj.get("status") or {}).get("cell") or {}).get("port")
            if port:
                self.ports.add(int(port))
        return obj


class Matrix:
    """Tasks of one namespace under test, with the operator(s) that run them."""

    def __init__(self, cluster, namespace: str, root: Path, model: ScriptedModel):
        self.cluster, self.namespace, self.root, self.model = cluster, namespace, root, model
        self.work_dir = root / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, Row] = {}
        self.operators: list[OperatorProcess] = []
        self.api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(cluster.kubeconfig_path)))
        self.port_range: tuple[int, int] | None = None

    # -- the operator --

    def start_operator(self, *args: str) -> OperatorProcess:
        # A start takes 2 s on an idle machine and over 30 s on a shared, overloaded one: no
        # row is about slow starts, so they get room.
        op = OperatorProcess(self.cluster, self.namespace, self.work_dir, "--health-timeout", "120s", *args).start()
        self.operators.append(op)
        for flag, value in zip(args, args[1:]):
            if flag == "--port-range":
                low, high = value.split("-")
                self.port_range = (int(low), int(high))
        return op

    @property
    def operator(self) -> OperatorProcess:
        return self.operators[-1]

    # -- tasks --

    def row(self, name: str, origin: Origin | None = None, **spec) -> Row:
        """A task on a fresh origin (or ``origin``, shared with other rows); ``spec`` overrides
        the defaults (dicts are merged one level)."""
        origin = origin or Origin(self.root / "origins", name)
        # No row is about the time box but test_crash's k-box; on a loaded machine a
        # crash-and-retry row takes minutes.
        body = agent_task(name, origin.url, self.model, description=f"fault row {name}", timeout="30m")["spec"]
        for key, value in spec.items():
            if isinstance(value, dict) and isinstance(body.get(key), dict):
                body[key] = {**body[key], **value}
            else:
                body[key] = value
        row = Row(name, origin, body)
        self.rows[name] = row
        return row

    def apply(self, row: Row) -> None:
        out = self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(row.manifest()))
        assert out.returncode == 0, out.stderr
        self.get(row)

    def get(self, row: Row) -> dict | None:
        try:
            obj = self.api.get_namespaced_custom_object("reactor.dev", "v1alpha1", self.namespace, "agenttasks", row.name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return row.see(obj)

    def phase(self, row: Row) -> str | None:
        obj = self.get(row)
        return ((obj or {}).get("status") or {}).get("phase")

    def wait(self, row: Row, predicate, what: str, timeout: float = 240) -> dict | None:
        seen: list[dict | None] = [None]

        def check() -> bool:
            seen[0] = self.get(row)
            return bool(predicate(seen[0]))

        wait_for(check, timeout, f"{row.name}: {what}", detail=lambda: self._detail(row, seen[0]))
        return seen[0]

    def wait_phase(self, row: Row, *phases: str, timeout: float = 240) -> dict:
        return self.wait(row, lambda o: o and (o.get("status") or {}).get("phase") in phases,
                         f"phase {' or '.join(phases)}", timeout)

    def wait_all_terminal(self, rows: list[Row], timeout: float = 420) -> None:
        def check() -> bool:
            done = True
            for row in rows:
                if row.final is None:
                    obj = self.get(row)
                    if ((obj or {}).get("status") or {}).get("phase") in TERMINAL:
                        row.final = obj
                    else:
                        done = False
            return done

        wait_for(check, timeout, "every task terminal",
                 detail=lambda: "\n".join(f"{r.name}: {self.phase(r)}" for r in rows if r.final is None)
                 + f"\noperator log:\n{self.operator.log()}")

    def delete(self, row: Row) -> None:
        out = self.cluster.kubectl("delete", "-n", self.namespace, "agenttask", row.name, "--wait=false")
        assert out.returncode == 0, out.stderr

    def events(self, row: Row) -> list[dict]:
        out = self.cluster.kubectl("get", "events", "-n", self.namespace, "--field-selector",
                                   f"involvedObject.name={row.name}", "-o", "json")
        assert out.returncode == 0, out.stderr
        return sorted(json.loads(out.stdout)["items"], key=lambda e: (e["metadata"]["creationTimestamp"],
                                                                        e["metadata"]["resourceVersion"]))

    def _detail(self, row: Row, obj: dict | None) -> str:
        status = json.dumps((obj or {}).get("status"), indent=1)[:3000]
        log = self.operator.log() if self.operators else ""
        return f"last status: {status}\noperator log:\n{log}"

    # -- what is left --

    def cell_id(self, row: Row) -> str:
        assert row.uid, f"{row.name} was never seen"
        return f"{self.namespace}.{row.name}.{row.uid[:8]}"

    def assert_nothing_left(self, row: Row, *, pushed: bool) -> None:
        """No opencode process of the task, no worktree, no port held, no finalizer stuck,
        the origin's base branch unchanged, the result branch pushed once iff ``pushed``."""
        cell = self.cell_id(row)
        left = find_marked_processes(str(self.work_dir.resolve()), cell)
        assert left == [], f"{row.name}: processes of its cell still run: {left}"
        worktrees = list((self.work_dir / "worktrees").glob(f"*/{safe_component(cell)}"))
        assert worktrees == [], f"{row.name}: worktree left: {worktrees}"
        assert not (self.work_dir / "cells" / safe_component(cell)).exists(), f"{row.name}: cell state left"
        held = [port for port in row.ports if not port_is_free(port)]
        assert held == [], f"{row.name}: ports still held: {held}"
        if self.get(row) is not None:  # no finalizer stuck: it goes when deleted
            self.delete(row)
        self.wait(row, lambda o: o is None, "deletion (finalizer released)", timeout=30)
        assert git(row.origin.path, "rev-parse", "refs/heads/main") == row.origin.main, "base branch changed"
        pushes = row.origin.pushes(row.branch)
        if pushed:
            assert len(pushes) == 1, f"{row.name}: pushed {len(pushes)} times: {pushes}"
        else:
            assert pushes == [] and not row.origin.has(row.branch), f"{row.name}: pushed although it did not succeed"

    def assert_range_free(self) -> None:
        """Every port of the operator's range is free and no server of the work dir runs."""
        assert find_marked_processes(str(self.work_dir.resolve())) == []
        if self.port_range:
            low, high = self.port_range
            held = [port for port in range(low, high) if not port_is_free(port)]
            assert held == [], f"ports of the operator's range still held: {held}"


def held_boot_binary(root: Path, seconds: float) -> Path:
    """An opencode binary that starts late for cells whose id contains 'hold-boot' (holds a
    task in Bootstrapping for ``seconds``), the real one otherwise."""
    wrapper = root / "opencode-held-boot"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$REACTOR_CELL" in *hold-boot*) sleep {seconds} ;; esac
        exec "{find_opencode_binary()}" "$@"
        """))
    wrapper.chmod(0o755)
    return wrapper


def held_boot_args(root: Path, seconds: float) -> tuple[str, ...]:
    """`reactor operator` flags for held_boot_binary: the wrapper, and the real install it
    execs, which cells may read (reads are an allowlist; the wrapper's dir is the only
    install the engine knows of)."""
    real = Path(os.path.realpath(find_opencode_binary()))
    install = next((p for p in real.parents if p.name == "node_modules"), real.parent)
    return ("--opencode-bin", str(held_boot_binary(root, seconds)), "--readable-path", str(install))


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
