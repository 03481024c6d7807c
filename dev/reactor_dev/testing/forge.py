"""A real Gitea for tests, benchmarks and `reactor dev-forge`: one process per session on
127.0.0.1, SQLite, offline, an admin user and an API token made with its own CLI.

The binary is built from Go modules by hack/forge/build.sh (`make forge`) into
~/.cache/reactor-forge/; REACTOR_GITEA_BIN points at another one (Gitea or Forgejo).

    with GiteaServer(tmp_path / "gitea") as forge:
        forge.create_repository("app", source=local_repo)   # pushed over smart HTTP
        forge.api("GET", "/repos/reactor/app/pulls")

Credentials: ``token`` (an admin's API token, all scopes: what the operator's forge Secret
holds in tests) and ``password`` (for git over HTTP); git gets them through environment
variables (an Authorization header), never on a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from reactor_dev.testing.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = ROOT / "hack" / "forge" / "build.sh"
VERSION = "1.26.0"
ADMIN = "reactor"
START_TIMEOUT = 60.0


class ForgeNotBuilt(RuntimeError):
    pass


def find_gitea(build: bool = True) -> Path:
    """The Gitea binary: $REACTOR_GITEA_BIN, the cached build, or (``build``) a build now."""
    if os.environ.get("REACTOR_GITEA_BIN"):
        return Path(os.environ["REACTOR_GITEA_BIN"])
    cached = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reactor-forge" / f"gitea-{VERSION}"
    if cached.is_file() and (cached.parent / f"{cached.name}.reactor-build").is_file():
        return cached
    if not build or not BUILD_SCRIPT.exists():
        raise ForgeNotBuilt(f"no Gitea binary at {cached}: run `make forge` (hack/forge/build.sh), "
                            "or point REACTOR_GITEA_BIN at one")
    out = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ForgeNotBuilt(f"hack/forge/build.sh failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _module_source() -> str:
    """Gitea's templates, read from the module cache (the binary is built without bindata)."""
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("go") else ""
    return str(Path(gomodcache or Path.home() / "go" / "pkg" / "mod") / f"code.gitea.io/gitea@v{VERSION}")


class GiteaServer:
    def __init__(self, data_dir: Path, port: int | None = None, binary: Path | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.binary = Path(binary) if binary else find_gitea()
        self.process: subprocess.Popen | None = None
        self.token = ""
        self.password = secrets.token_hex(12)
        self.config = self.data_dir / "app.ini"
        self.log_path = self.data_dir / "gitea.log"
        self.start_seconds = 0.0  # the last start: migrate + user + web until healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v1"

    def repo_url(self, name: str, owner: str = ADMIN) -> str:
        return f"{self.url}/{owner}/{name}.git"

    # -- lifecycle --

    def __enter__(self) -> GiteaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        data = self.data_dir.resolve()
        self.config.write_text(f"""\
APP_NAME = reactor test forge
RUN_MODE = prod
I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true
WORK_PATH = {data}

[server]
PROTOCOL = http
HTTP_ADDR = 127.0.0.1
HTTP_PORT = {self.port}
ROOT_URL = {self.url}/
DISABLE_SSH = true
OFFLINE_MODE = true
STATIC_ROOT_PATH = {_module_source()}
APP_DATA_PATH = {data}/data
LFS_START_SERVER = false

[database]
DB_TYPE = sqlite3
PATH = {data}/data/gitea.db
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT = {data}/repos
DEFAULT_BRANCH = main

[security]
INSTALL_LOCK = true
SECRET_KEY = {secrets.token_hex(16)}
INTERNAL_TOKEN = {secrets.token_hex(32)}
PASSWORD_HASH_ALGO = pbkdf2_hi

[service]
DISABLE_REGISTRATION = true
REQUIRE_SIGNIN_VIEW = false

[actions]
ENABLED = false

[indexer]
ISSUE_INDEXER_TYPE = db
REPO_INDEXER_ENABLED = false

[cron]
ENABLED = false

[mailer]
ENABLED = false

[log]
MODE = file
LEVEL = Warn
ROOT_PATH = {data}/log
""")

    def _cli(self, *args: str) -> str:
        out = subprocess.run([str(self.binary), "--config", str(self.config), *args], capture_output=True, text=True,
                             cwd=self.data_dir, env=self._env(), timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"gitea {args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out.stdout

    def _env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        return {**keep, "HOME": str(self.data_dir.resolve()), "GITEA_WORK_DIR": str(self.data_dir.resolve()),
                "USER": os.environ.get("USER", "root")}

    def start(self) -> GiteaServer:
        """First start: configure, migrate, create the admin and its token. Later starts (after
        ``stop``) reuse the data: the same repositories, pull requests, token and port."""
        began = time.monotonic()
        if not self.token:
            self._write_config()
            self._cli("migrate")
            out = self._cli("admin", "user", "create", "--admin", "--username", ADMIN, "--password", self.password,
                            "--email", f"{ADMIN}@example.invalid", "--must-change-password=false",
                            "--access-token", "--access-token-name", "tests", "--access-token-scopes", "all")
            self.token = out.strip().splitlines()[-1].split()[-1]  # "Access token was successfully created... <token>"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(self.binary), "--config", str(self.config), "web"], cwd=self.data_dir,
                                            env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"gitea exited {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/api/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, START_TIMEOUT, "gitea healthy", detail=self.log, interval=0.1)
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def rss_bytes(self) -> int:
        import psutil

        if self.process is None or self.process.poll() is not None:
            return 0
        return psutil.Process(self.process.pid).memory_info().rss

    # -- the API, as the admin --

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.api_url}{path}", headers={"Authorization": f"token {self.token}"},
                             timeout=30, **kwargs)

    def git_env(self) -> dict[str, str]:
        """Environment for git talking to this forge as the admin (a header, not argv or a URL)."""
        import base64

        basic = base64.b64encode(f"{ADMIN}:{self.password}".encode()).decode()
        return {**os.environ, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}", "GIT_TERMINAL_PROMPT": "0"}

    def create_repository(self, name: str, source: Path | None = None, branches: tuple[str, ...] = ("main",)) -> str:
        """An empty repository of the admin, then ``source``'s branches pushed into it. Returns its URL."""
        response = self.api("POST", "/user/repos", json={"name": name, "auto_init": False, "default_branch": "main"})
        assert response.status_code == 201, response.text
        if source is not None:
            self.push(source, name, *branches)
        return self.repo_url(name)

    def push(self, source: Path, name: str, *refspecs: str) -> None:
        out = subprocess.run(["git", "push", "--quiet", self.repo_url(name), *refspecs], cwd=source,
                             env=self.git_env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        # Gitea takes a push in through its hooks and a queue: a repository that was empty can
        # answer 404 to a pull request for a moment after the push returned (measured under
        # load). Wait until the API shows each pushed branch, as a forge user would.
        for refspec in refspecs:
            branch = refspec.rpartition(":")[2].removeprefix("refs/heads/")
            wait_for(lambda: self.api("GET", f"/repos/{ADMIN}/{name}/branches/{branch}").status_code == 200,
                     30, f"branch {branch} of {name} on the forge", interval=0.1)

    def pull_requests(self, name: str, owner: str = ADMIN) -> list[dict]:
        response = self.api("GET", f"/repos/{owner}/{name}/pulls", params={"state": "all", "limit": 50})
        assert response.status_code == 200, response.text
        return response.json()

    def statuses(self, name: str, commit: str, owner: str = ADMIN) -> list[dict]:
        response = self.api("GET", f"/repos/{owner}/{name}/statuses/{commit}")
        assert response.status_code == 200, response.text
        return response.json()
