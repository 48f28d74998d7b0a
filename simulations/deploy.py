"""Deployment across hospitals: certificates, SuperNode keys, admissions, and a federation's processes.

The app is the same one the simulation runs; only the processes around it
differ. Flower 1.42 serves the SuperLink's Fleet API (what SuperNodes call),
Control API (``flwr run``, ``flwr supernode register``) and Runtime API on one
HTTPS port. With ``--enable-supernode-auth`` a SuperNode connects only with a
private key whose public key was registered through the Control API; the
admissions live in the SuperLink's ``--database`` file and so survive its
restart.

* :func:`make_certs`: a certificate authority and the SuperLink's certificate
  for the names and addresses the hospitals dial (``cryptography``, no openssl);
* :func:`make_keys`: one SuperNode key pair per hospital (NIST P-384 in
  OpenSSH format, what ``flower-supernode`` and ``flwr supernode register`` read);
* :class:`Admissions`: ``flwr supernode register|unregister`` against a
  SuperLink, with a record of which name holds which node id and key;
* :class:`Federation`: starts a SuperLink and SuperNodes as child processes with
  the commands ``docs/DEPLOY.md`` gives, runs the app with ``flwr run``, and stops
  every process it started by its id (``fedfuse deploy local`` and the tests).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import shlex
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.cache import write_json
from simulations.flower import (
    BIN,
    children,
    flower_env,
    flwr_cli,
    free_port,
    stop_tree,
    submit_and_follow,
    wait_ready,
    write_connection,
)
from simulations.runs import (
    OWNER_ENV,
    FolderError,
    child,
    die_with_parent,
    hold,
    is_marked,
    mark,
    marker,
    open_log,
)

CERT_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept for a server certificate
MAX_CERT_DAYS = 36500  # a century: beyond it, dates near X.509's year 9999 limit overflow


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and why."""


def _private_pem(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _write_secret(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); replacing a key or certificate locks out "
                              "everyone who trusts the old one: pass --force to do it on purpose")


def make_certs(out: Path, hosts: list[str], days: int = CERT_DAYS, force: bool = False) -> dict[str, Path]:
    """A CA (``ca.crt``, ``ca.key``) and the SuperLink's certificate (``superlink.crt``, ``superlink.key``).

    Every entry of ``hosts`` (a DNS name or an IP address) goes into the
    certificate's subject alternative names: SuperNodes must dial one of them.
    ``ca.crt`` is what each hospital receives; ``ca.key`` never leaves the
    coordinator.
    """
    if not hosts:
        raise ValueError("--host: give at least one name or address the hospitals will use to reach the SuperLink")
    if not 1 <= days <= MAX_CERT_DAYS:  # 0 or less would issue a certificate that has already expired
        raise ValueError(f"--days {days}: expected a validity from 1 to {MAX_CERT_DAYS} days (default {CERT_DAYS})")
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    out = Path(out)
    paths = {k: out / f for k, f in (("ca", "ca.crt"), ("ca_key", "ca.key"), ("cert", "superlink.crt"),
                                      ("key", "superlink.key"))}
    _refuse_overwrite(list(paths.values()), force)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfuse"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedfuse federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(paths["ca_key"], _private_pem(ca_key))
    _write_secret(paths["key"], _private_pem(key))
    return paths


def make_keys(out: Path, names: list[str], force: bool = False) -> list[Path]:
    """A SuperNode key pair per name: ``<name>`` (private, stays at the hospital) and ``<name>.pub`` (to admit)."""
    out = Path(out)
    for name in names:
        child(out, name, "--names")  # a key file of that name stays inside --out
    if len(set(names)) < len(names):
        raise ValueError(f"--names {','.join(names)}: a name appears twice; expected one key pair per hospital")
    _refuse_overwrite([out / n for n in names] + [out / f"{n}.pub" for n in names], force)
    out.mkdir(parents=True, exist_ok=True)
    publics = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST curves only
        _write_secret(out / name, _private_pem(key, serialization.PrivateFormat.OpenSSH))
        pub = out / f"{name}.pub"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
        publics.append(pub)
    return publics


def key_fingerprint(public_key: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it."""
    parts = Path(public_key).read_text().split()
    if len(parts) < 2:
        raise DeployError(f"{public_key}: not an OpenSSH public key (expected 'ecdsa-sha2-nistp384 AAAA...')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise DeployError(f"{public_key}: the key's base64 part does not decode") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class Admissions:
    """Which hospitals a SuperLink admits, changed with ``flwr supernode register|unregister``.

    Flower's node list shows node ids only, so ``admissions.json`` in
    ``folder`` (the coordinator's deployment folder, which holds ``ca.crt``)
    records each admitted name with its node id and key fingerprint; a revoke
    by name or key file looks the node id up there.
    """

    def __init__(self, folder: Path, superlink: str, ca: Path | None = None):
        self.folder = Path(folder)
        self.record = self.folder / "admissions.json"
        ca = Path(ca) if ca else self.folder / "ca.crt"
        if not ca.is_file():
            raise FileNotFoundError(f"{ca}: no CA certificate (make one with `fedfuse deploy certs`)")
        home = self.folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        write_connection(home, superlink, ca.resolve())
        self.env = flower_env(home, home / "ray")

    def _flwr(self, *args: str) -> dict:
        done = flwr_cli(["supernode", *args, "fedfuse", "--format", "json"], self.env, capture_output=True, timeout=120)
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            out = {"success": False, "error-message": (done.stdout + done.stderr).strip()}
        if not out.get("success"):  # flwr exits 0 with --format json even when it failed
            raise DeployError(f"flwr supernode {args[0]}: {out.get('error-message', out)}")
        return out

    def _entries(self) -> dict[str, dict]:
        return json.loads(self.record.read_text()) if self.record.is_file() else {}

    def admit(self, public_key: Path, name: str | None = None) -> int:
        """Register a hospital's public key; returns its node id."""
        public_key = Path(public_key)
        if not public_key.is_file():
            raise FileNotFoundError(f"{public_key}: no such public key file")
        name = name or public_key.name.removesuffix(".pub")
        entries = self._entries()
        if name in entries:
            raise DeployError(f"{name!r} is already admitted as node {entries[name]['node_id']}; revoke it first "
                              "or choose another --name")
        node_id = int(self._flwr("register", str(public_key), "--name", name)["node-id"])
        entries[name] = {"node_id": node_id, "key": key_fingerprint(public_key),
                         "admitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json(self.record, entries)
        return node_id

    def revoke(self, who: str) -> int:
        """Unregister a hospital named by its admitted name, its node id or its public key file."""
        entries = self._entries()
        if who in entries:
            name = who
        elif Path(who).is_file():
            fp = key_fingerprint(Path(who))
            name = next((n for n, e in entries.items() if e["key"] == fp), None)
            if name is None:
                raise DeployError(f"{who}: no admitted hospital holds this key (see {self.record})")
        elif who.isdigit():
            name = next((n for n, e in entries.items() if e["node_id"] == int(who)), None)
        else:
            raise DeployError(f"{who!r} is neither an admitted name ({', '.join(entries) or 'none'}), a node id, "
                              "nor a public key file")
        node_id = entries[name]["node_id"] if name else int(who)
        self._flwr("unregister", str(node_id))
        if name:
            del entries[name]
            write_json(self.record, entries)
        return node_id

    def online(self) -> list[int]:
        """Node ids of the SuperNodes connected now."""
        nodes = self._flwr("list")["nodes"]
        return [int(n["node-id"]) for n in nodes if n["status"] == "online"]


class Federation:
    """A SuperLink and SuperNodes on this machine, as child processes, each stopped by its id on close.

    Every process gets the environment Flower needs here (no runtime installs,
    no telemetry, ``FLWR_HOME`` inside ``folder``) and logs to
    ``folder/<name>.log``. The command lines are those of ``docs/DEPLOY.md``.
    """

    def __init__(self, folder: Path, certs: dict[str, Path], host: str = "127.0.0.1", port: int = 9093,
                 echo=lambda line: None):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs, self.host, self.port, self.echo = certs, host, port, echo
        self.address = f"{host}:{port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.helpers: list[int] = []  # process groups the SuperLink's SuperExec leads

    def _env(self, name: str) -> dict[str, str]:
        home = child(self.folder, name, "site name") / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        return {**flower_env(home, home / "ray"), OWNER_ENV: str(self.folder)}  # see simulations.runs.hold

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        child(self.folder, name, "site name")  # its log and folder stay inside this federation's folder
        self.echo("$ " + shlex.join(argv))
        log = open_log(self.folder / f"{name}.log", binary=True)
        proc = subprocess.Popen(argv, cwd=self.folder / name, env=self._env(name), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent())
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self, database: Path) -> None:
        """``flower-superlink`` with TLS, SuperNode authentication and a database file; waits until it answers."""
        c = self.certs
        proc = self._start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]),
            "--ssl-keyfile", str(c["key"]), "--enable-supernode-auth", "--database", str(database),
            "--host", self.host, "--port", str(self.port), "--disable-runtime-dependency-installation"])
        context = ssl.create_default_context(cafile=str(c["ca"]))
        wait_ready(proc, f"https://{self.address}/health", self.folder / "superlink.log", context=context)

    def start_supernode(self, name: str, data_dir: Path, key: Path, port: int, ca: Path | None = None,
                        max_retries: int | None = None) -> subprocess.Popen:
        """``flower-supernode`` for one hospital: its data folder, its private key, the federation's CA."""
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address,
                "--root-certificates", str(ca or self.certs["ca"]), "--auth-supernode-private-key", str(key),
                "--node-config", f'data-dir="{Path(data_dir).resolve()}" site-name="{name}"',
                "--port", str(port)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return self._start(name, argv)

    def run(self, run_config: dict, run_dir: Path, echo=print) -> str:
        """``flwr run`` the app with ``run_config`` (flat overrides), outputs in ``run_dir``; returns the run id."""
        env = self._env("flwr-cli")
        write_connection(Path(env["FLWR_HOME"]), self.address, self.certs["ca"])
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_log(run_dir / "flower.log") as log:
            return submit_and_follow(env, run_dir / "run_config.toml", {**run_config, "run-dir": str(run_dir)},
                                     log, run_dir / "flower.log", echo,
                                     on_submitted=lambda: self.helpers.extend(self._superlink_children()))

    def _superlink_children(self) -> list[int]:
        sl = self.procs.get("superlink")
        return children(sl.pid) if sl else []

    def wait_online(self, admissions: Admissions, count: int, timeout: float = 60) -> list[int]:
        """Node ids once ``count`` SuperNodes are connected; raises with the logs' names if they are not."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            online = admissions.online()
            if len(online) >= count:
                return online
            time.sleep(1)
        raise DeployError(f"only {len(online)} of {count} SuperNodes connected in {timeout:.0f} s; "
                          f"see the logs in {self.folder}")

    def close(self) -> None:
        """Stop every process started here (SuperNodes first), by process group, also after a failure."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs[name]
            known = tuple(self.helpers) + tuple(self._superlink_children()) if name == "superlink" else ()
            stop_tree(proc.pid, known_groups=known)
            proc.wait()
        self.procs.clear()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def deploy_local(out: Path, sites: int = 3, run_config: dict | None = None, echo=print) -> Path:
    """The whole deployment on this machine: data, certificates, keys, admissions, SuperLink, SuperNodes, a run.

    Each hospital reads only its own generated folder ``out/data/site-<k>``;
    the processes are those a real deployment runs, on 127.0.0.1. ``out`` must
    be new, empty or one this function made (it replaces its coordinator's
    keys): a real coordinator's folder is refused. Returns the run folder.
    """
    from simulations.synth import synth

    out = Path(out).resolve()
    if out.is_dir() and any(out.iterdir()) and not is_marked(out, "deploy"):
        raise FolderError(f"--out {out}: not empty and not made by `fedfuse deploy local` (no "
                          f"{marker(out, 'deploy').name} file); a try replaces the certificates and keys in it, so "
                          "choose a new folder")
    with hold(out):
        mark(out, "deploy")
        data = out / "data"
        if not data.is_dir():
            echo(f"generating {sites} hospitals in {data} ...")
            synth(data, sites=sites, seed=0, preset="quick")
        return _try_federation(out, data, sites, run_config or {}, echo)


def _try_federation(out: Path, data: Path, sites: int, run_config: dict, echo) -> Path:
    """:func:`deploy_local`'s certificates, keys, admissions, processes and run, in ``out`` (made by it)."""
    names = [f"site-{k}" for k in range(sites)]
    shutil.rmtree(out / "coordinator", ignore_errors=True)  # a try starts with no admissions
    certs = make_certs(out / "coordinator", ["localhost", "127.0.0.1"])
    keys = out / "keys"
    make_keys(keys, names, force=True)
    with Federation(out / "processes", certs, port=free_port(), echo=echo) as fed:
        fed.start_superlink(out / "coordinator" / "state.db")
        admissions = Admissions(out / "coordinator", fed.address)
        for name in names:
            echo(f"admitted {name} as node {admissions.admit(keys / f'{name}.pub', name)}")
        for name in names:
            fed.start_supernode(name, data / name, keys / name, free_port())
        fed.wait_online(admissions, sites)
        run_dir = out / "runs" / time.strftime("deploy-%Y%m%d-%H%M%S")
        fed.run({"server.eval_data": str(data / "holdout"), "federation.min_sites": sites, **run_config},
                run_dir, echo=echo)
    return run_dir
