"""hack/node/install-packages.sh (what `make test` runs first) on a stand-in system root:
apt-get, dpkg-query and id are stubs, the postinst of the stub apt-get enables its services
at boot as Debian's do (deb-systemd-helper, update-rc.d); systemctl is the real one
(`--root`). Seconds, no root, nothing installed."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from reactor_dev.testing.shipped import ROOT

SCRIPT = ROOT / "hack" / "node" / "install-packages.sh"
UNIT = "[Unit]\nDescription={name}\n[Service]\nExecStart=/usr/bin/{name}\n[Install]\nWantedBy=multi-user.target\n"

pytestmark = pytest.mark.skipif(not Path("/usr/bin/systemctl").exists() and not Path("/bin/systemctl").exists(),
                                reason="needs systemctl (systemd's, for --root)")


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def system(tmp_path: Path) -> Path:
    """A system root with ssh enabled at boot (systemd) and cron (SysV) before the install."""
    root = tmp_path / "root"
    units, wants = root / "lib/systemd/system", root / "etc/systemd/system/multi-user.target.wants"
    units.mkdir(parents=True), wants.mkdir(parents=True), (root / "etc/rc2.d").mkdir(parents=True)
    (units / "ssh.service").write_text(UNIT.format(name="sshd"))
    (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    (root / "etc/rc2.d/S01cron").symlink_to("../init.d/cron")
    return root


def run(system: Path, tmp_path: Path, *args: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    stub(bin_dir, "id", f'[[ "$1" == -u ]] && echo {uid} || exec /usr/bin/id "$@"\n')
    stub(bin_dir, "dpkg-query", "exit 1\n")  # nothing is installed
    # What the packages' maintainer scripts do: ask policy-rc.d before starting a service,
    # enable each at boot.
    stub(bin_dir, "apt-get", f"""\
        [[ $1 == install ]] || exit 0
        root=$REACTOR_INSTALL_SYSROOT
        "$root/usr/sbin/policy-rc.d" containerd start; echo "policy-rc.d: $?" >> {log}
        for name in containerd prometheus; do
          printf '{UNIT.format(name="stand-in").replace(chr(10), chr(92) + 'n')}' > "$root/lib/systemd/system/$name.service"
          ln -s "/lib/systemd/system/$name.service" "$root/etc/systemd/system/multi-user.target.wants/$name.service"
        done
        ln -s ../init.d/prometheus "$root/etc/rc2.d/S01prometheus"
        echo "installed ${{*: -3}}" >> {log}
        """)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REACTOR_INSTALL_SYSROOT": str(system)}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def boot_links(system: Path) -> list[str]:
    return sorted(str(p.relative_to(system)) for p in [*system.glob("etc/systemd/system/*.wants/*"),
                                                       *system.glob("etc/rc?.d/S*")])


def test_installing_starts_nothing_and_enables_nothing_at_boot_but_keeps_what_was_enabled(system, tmp_path):
    before = boot_links(system)
    out = run(system, tmp_path, "node", "observe")
    assert out.returncode == 0, out.stderr
    log = (tmp_path / "apt.log").read_text()
    assert "policy-rc.d: 101" in log, "the install may not start a service"
    assert "installed" in log
    assert boot_links(system) == before, "the install enabled something at boot, or disabled what was"
    assert not (system / "usr/sbin/policy-rc.d").exists(), "the policy is only for the install"
    assert "containerd.service" in out.stderr and "prometheus" in out.stderr


def test_without_root_missing_packages_are_named_and_skipped_when_optional(system, tmp_path):
    out = run(system, tmp_path, "--optional", "node", uid=1000)
    assert out.returncode == 0, out.stderr
    assert "not root" in out.stderr and "containerd" in out.stderr and "skipped" in out.stderr
    assert not (tmp_path / "apt.log").exists(), "nothing was installed"
    refused = run(system, tmp_path, "node", uid=1000)  # `make image`: the build cannot go on without them
    assert refused.returncode == 1 and "need root" in refused.stderr
