"""The container image, built and run for real: the Dockerfile at the top of the repository is
built with buildah on a Debian base made here, then the image's own command serves on loopback
and mail clients log in through it against the test Dovecot and identity provider.

Docker Hub is not reachable from CI, and `podman run`/docker do not work there, so:

1. ``debootstrap --variant=minbase bookworm`` into a folder (cached for the day under
   $PROXY_CONTAINER_CACHE, default /var/tmp/oauth2-mail-proxy-ci, as a tarball);
2. ``podman import`` of that tarball under the name the Dockerfile's FROM uses;
3. ``buildah bud --isolation chroot --storage-driver vfs --pull=never`` of the repository
   (its .dockerignore keeps the context to the package). pip inside the build reaches PyPI;
   the host's CA bundle is mounted for that step only, for networks that inspect TLS;
4. ``buildah run --isolation chroot`` of the image's CMD with the config and token volumes:
   chroot isolation shares the host's network, so loopback reaches the test servers.

All container storage lives in a private folder that is removed afterwards. This test needs
root and the Debian packages debootstrap, buildah and podman (tests/run.sh installs them);
without them it fails rather than skips. ``pytest -m "not container"`` leaves it out locally.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.harness import ROOT, free_port, wait_port
from tests.opsbed import copy_config

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

CACHE = Path(os.environ.get("PROXY_CONTAINER_CACHE", "/var/tmp/oauth2-mail-proxy-ci"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE = "localhost/oauth2-mail-proxy:test"
TOOLS = {"debootstrap": "debootstrap", "buildah": "buildah", "podman": "podman"}
CONTAINER_UID = 10001


def run(cmd: list[str], log: Path, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, its output appended to ``log``; fail the test with the output's tail."""
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kwargs)
        out.write(f"[exit {result.returncode} after {time.monotonic() - started:.0f} s]\n".encode())
    if result.returncode != 0:
        pytest.fail(f"{cmd[0]} failed ({result.returncode}):\n{log.read_text(errors='replace')[-6000:]}")
    return result


def from_image(dockerfile: Path) -> str:
    """The fully qualified name of the Dockerfile's base image (what buildah resolves FROM to)."""
    match = re.search(r"(?im)^FROM\s+(\S+)", dockerfile.read_text())
    assert match, "no FROM in the Dockerfile"
    name = match.group(1)
    first = name.split("/", 1)[0]
    if "/" not in name:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


def base_tarball(log: Path) -> Path:
    """A minimal Debian 12 root file system as a tarball, made once a day."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"bookworm-minbase-{time.strftime('%Y%m%d')}.tar"
    if tarball.exists():
        return tarball
    for old in CACHE.glob("bookworm-minbase-*.tar"):
        old.unlink()
    rootfs = CACHE / f"rootfs-{os.getpid()}"
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR], log, timeout=900)
        for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], log, timeout=300)
        partial.rename(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (buildah → chroot runtime → exec → the command)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory):
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the container test needs {', '.join(missing)} (Debian packages; `bash tests/run.sh` "
                    "installs them as root). Leave the test out with -m 'not container'.")
    if os.geteuid() != 0:
        pytest.fail("the container test needs root (buildah with chroot isolation and vfs storage)")
    CACHE.mkdir(parents=True, exist_ok=True)
    folder = CACHE / f"containers-{uuid.uuid4().hex[:8]}"
    runroot = Path(tempfile.mkdtemp(prefix="ompc-"))  # podman wants a run root path under 50 characters
    options = ["--root", str(folder), "--runroot", str(runroot), "--storage-driver", "vfs"]
    yield folder, options
    subprocess.run(["buildah", *options, "rm", "--all"], capture_output=True, timeout=120)
    subprocess.run(["buildah", *options, "rmi", "--all", "--force"], capture_output=True, timeout=300)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(runroot, ignore_errors=True)


@pytest.fixture(scope="module")
def image(storage, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder, options = storage
    log = tmp_path_factory.mktemp("container-build") / "build.log"
    timings = {}
    started = time.monotonic()
    tarball = base_tarball(log)
    timings["base"] = time.monotonic() - started

    started = time.monotonic()
    run(["podman", *options, "import", str(tarball), from_image(ROOT / "Dockerfile")], log, timeout=300)
    timings["import"] = time.monotonic() - started

    # pip in the build reaches PyPI over HTTPS; give it the host's CA bundle (covers networks with
    # TLS inspection; on others it is simply the public CAs). Mounted for the build's RUN steps only.
    pip_conf = log.parent / "pip.conf"
    pip_conf.write_text("[global]\ncert = /run/host-ca-bundle.pem\n")
    host_bundle = next((p for p in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
                        if os.path.exists(p)), None)
    mounts = ["-v", f"{host_bundle}:/run/host-ca-bundle.pem:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"] \
        if host_bundle else []
    started = time.monotonic()
    run(["buildah", *options, "bud", "--isolation", "chroot", "--pull=never", "--format", "docker", *mounts,
         "-t", IMAGE, "-f", str(ROOT / "Dockerfile"), str(ROOT)], log, timeout=1200)
    timings["build"] = time.monotonic() - started
    inspected = json.loads(subprocess.run(["buildah", *options, "inspect", "--type", "image", IMAGE],
                                          capture_output=True, text=True, timeout=60, check=True).stdout)
    print(f"container image: base {timings['base']:.0f} s, import {timings['import']:.0f} s, "
          f"build {timings['build']:.0f} s")
    return {"options": options, "config": inspected["Docker"]["config"], "log": log}


def test_image_is_built_as_documented(image) -> None:
    config = image["config"]
    assert config["User"] == f"{CONTAINER_UID}:{CONTAINER_UID}"          # not root
    assert config["Cmd"] == ["proxy", "serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "proxy", "health"]
    assert set(config["Volumes"]) == {"/config", "/tokens"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PROXY_CONFIG"] == "/config/config.yaml" and env["PROXY_TOKENS_PATH"] == "/tokens"
    assert env["PROXY_LOG_FORMAT"] == "json"


def test_log_in_through_the_running_container(image, smtp_authorized: Path, tmp_path: Path, pki, idp, dovecot,
                                              sink) -> None:
    options = image["options"]
    # The config volume: the authorized config, with the test CA beside it (relative paths resolve
    # against /config inside); the token volume: the store, owned by the container's user.
    site = tmp_path / "site"
    copy_config(smtp_authorized, site)
    shutil.copy(pki.ca_file, site / "test-ca.pem")
    config_path = site / "config.yaml"
    data = yaml.safe_load(config_path.read_text())
    data["identity"]["ca_file"] = data["imap"]["ca_file"] = data["smtp"]["ca_file"] = "test-ca.pem"
    data["tokens"] = {"path": "/not/used/the/environment/sets/it"}
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    config_dir, tokens_dir = tmp_path / "config", tmp_path / "tokens"
    config_dir.mkdir()
    for name in ("config.yaml", "test-ca.pem"):
        shutil.copy(site / name, config_dir / name)
    shutil.copytree(site / "tokens", tokens_dir)
    for path in [tokens_dir, *tokens_dir.iterdir()]:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
    for path in [config_dir, *config_dir.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    imap_port, smtp_port, admin_port = free_port(), free_port(), free_port()
    container = subprocess.run(["buildah", *options, "from", "--pull=never", IMAGE], capture_output=True,
                               text=True, timeout=120, check=True).stdout.strip()
    # buildah 1.28's `run` hides -v mounts behind the image's own VOLUMEs once there are two of
    # them (docker/podman run do not): drop the declarations from this working container only.
    subprocess.run(["buildah", *options, "config", "--volume", "/config-", "--volume", "/tokens-", container],
                   capture_output=True, timeout=60, check=True)
    env = ["-e", f"PROXY_IMAP_LISTEN=127.0.0.1:{imap_port}", "-e", f"PROXY_SMTP_LISTEN=127.0.0.1:{smtp_port}",
           "-e", f"PROXY_ADMIN_LISTEN=127.0.0.1:{admin_port}"]
    volumes = ["-v", f"{config_dir}:/config:ro", "-v", f"{tokens_dir}:/tokens"]
    runner = ["buildah", *options, "run", "--isolation", "chroot", *env, *volumes, container, "--"]
    out_path = tmp_path / "container.log"
    stored = (f"From: {SMTP_USER}\r\nSubject: read in a container\r\nMessage-ID: <{uuid.uuid4()}@example.com>"
              "\r\n\r\nHello.\r\n").encode()
    dovecot.deliver(SMTP_USER, stored)
    sink.reset()
    with open(out_path, "wb") as out:
        served = subprocess.Popen([*runner, *image["config"]["Cmd"]], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", imap_port, timeout=60, process=served)
            wait_port("127.0.0.1", smtp_port, timeout=30, process=served)
        except Exception:
            pytest.fail(f"the container did not start serving:\n{out_path.read_text(errors='replace')[-4000:]}")
        imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
        assert imap.login(SMTP_USER, SMTP_PASSWORD)[0] == "OK"
        typ, count = imap.select("INBOX")
        typ, fetched = imap.fetch(count[0], "(BODY.PEEK[])")
        assert typ == "OK" and fetched[0][1] == stored
        imap.logout()
        sent = (f"From: {SMTP_USER}\r\nTo: bob@example.org\r\nSubject: sent from a container\r\n"
                f"Message-ID: <{uuid.uuid4()}@example.com>\r\n\r\nHello.\r\n").encode()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.login(SMTP_USER, SMTP_PASSWORD)
            assert client.sendmail(SMTP_USER, ["bob@example.org"], sent) == {}
        assert [m.data_after_received() for m in sink.wait_for_messages(1)] == [sent]

        health_cmd = image["config"]["Healthcheck"]["Test"][1:]            # the HEALTHCHECK, run inside
        health = subprocess.run([*runner, *health_cmd], capture_output=True, text=True, timeout=120)
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout)["listeners"] == {"imap": True, "smtp": True}

        # SIGTERM to the proxy (buildah run does not forward signals): graceful stop, exit 0.
        serving = [p for p in descendants(served.pid) if "serve" in cmdline(p) and "proxy" in " ".join(cmdline(p))]
        assert serving, "the proxy process was not found under buildah run"
        os.kill(serving[-1], signal.SIGTERM)
        assert served.wait(60) == 0
    finally:
        if served.poll() is None:
            for pid in reversed(descendants(served.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            served.kill()
            served.wait(30)
        subprocess.run(["buildah", *options, "rm", container], capture_output=True, timeout=120)
    output = out_path.read_text(errors="replace")
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(r.get("event") == "login" and r.get("protocol") == "imap" and r.get("result") == "ok" for r in records)
    assert any(r.get("event") == "session_end" and r.get("protocol") == "smtp" for r in records)
    assert records[-1]["message"] == "stopped"
    for secret in [SMTP_PASSWORD, *idp.issued_tokens()]:
        assert secret not in output
