"""Deployment: certificates and keys, the site check, and a real TLS + node-authenticated federation."""

import json
import math
import shutil
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from shared.config import DataConfig
from shared.privacy import epsilon, read_ledger
from shared.site_check import check_site
from simulations.cli import main
from simulations.deploy import Admissions, Federation, key_fingerprint, make_certs, make_keys
from simulations.flower import free_port
from simulations.synth import synth
from tests.helpers import processes_mentioning


def test_certs_chain_to_the_ca_and_name_every_host(tmp_path):
    paths = make_certs(tmp_path, ["fedfuse.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedfuse.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    ssl.create_default_context(cafile=str(paths["ca"])).load_cert_chain(paths["cert"], paths["key"])
    assert paths["key"].stat().st_mode & 0o077 == 0 and paths["ca_key"].stat().st_mode & 0o077 == 0
    other = make_certs(tmp_path / "other", ["fedfuse.example.org"])
    with pytest.raises(InvalidSignature):  # another CA's certificate does not verify against this CA
        x509.load_pem_x509_certificate(other["cert"].read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(FileExistsError, match="--force"):
        make_certs(tmp_path, ["localhost"])


def test_keys_are_p384_openssh_pairs_with_ssh_keygen_fingerprints(tmp_path):
    pubs = make_keys(tmp_path, ["hospital-a", "hospital-b"])
    private = load_ssh_private_key((tmp_path / "hospital-a").read_bytes(), None)
    public = load_ssh_public_key(pubs[0].read_bytes())
    assert private.curve.name == "secp384r1" and private.public_key() == public
    assert key_fingerprint(pubs[0]) != key_fingerprint(pubs[1])
    keygen = shutil.which("ssh-keygen")
    if keygen:  # the same fingerprint an operator sees with `ssh-keygen -l -f hospital-a.pub`
        shown = subprocess.run([keygen, "-l", "-f", str(pubs[0])], capture_output=True, text=True).stdout
        assert key_fingerprint(pubs[0]) in shown
    with pytest.raises(FileExistsError):
        make_keys(tmp_path, ["hospital-a"])


def test_site_check_names_every_problem_of_a_broken_folder(quick_data, tmp_path, capsys):
    assert check_site(quick_data / "site-0", DataConfig()).ok
    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-0", site, ignore=shutil.ignore_patterns(".fedfuse-cache"))
    (site / "mimic-iv/hosp/labevents.csv.gz").unlink()
    tiff = sorted((site / "BreCaHAD/images").glob("*.tif"))[0]
    tiff.write_bytes(tiff.read_bytes()[:900])
    with open(site / "linkage.csv", "a") as f:
        f.write("Case_77,10100001\n")
    report = check_site(site, DataConfig())
    assert len(report.problems) == 3, report.problems
    tiff_problem, table_problem, link_problem = report.problems
    assert str(tiff) in tiff_problem and "cannot decode" in tiff_problem
    assert "labevents.csv.gz" in table_problem and "missing table" in table_problem
    lines = (site / "linkage.csv").read_text().splitlines()
    assert "linkage.csv" in link_problem and f"row {len(lines)} (Case_77)" in link_problem
    assert main(["site", "check", str(site)]) == 1
    out = capsys.readouterr().out
    assert out.count("problem: ") == 3 and "3 problem(s)" in out


def test_site_check_finds_unknown_subjects_and_unlinked_cases(quick_data, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(quick_data / "site-1", site, ignore=shutil.ignore_patterns(".fedfuse-cache"))
    rows = (site / "linkage.csv").read_text().splitlines()
    first_case = rows[1].split(",")[0]
    (site / "linkage.csv").write_text("\n".join([rows[0], *rows[2:], f"{rows[2].split(',')[0]}x,424242"]) + "\n")
    problems = check_site(site, DataConfig()).problems
    assert any(f"no row for case(s) {first_case}" in p for p in problems), problems
    assert any("subject_id that is not in" in p and "(424242)" in p for p in problems), problems


@pytest.mark.e2e
def test_tls_federation_admits_only_registered_hospitals(tmp_path):
    """A SuperLink with TLS and SuperNode authentication, 3 admitted hospitals, a revoked one, a wrong CA."""
    data, keys = tmp_path / "data", tmp_path / "keys"
    synth(data, sites=3, seed=0, preset="quick")
    certs = make_certs(tmp_path / "coordinator", ["localhost", "127.0.0.1"])
    foreign_ca = make_certs(tmp_path / "elsewhere", ["127.0.0.1"])["ca"]
    names = ["site-0", "site-1", "site-2", "intruder"]
    make_keys(keys, names)
    with Federation(tmp_path / "processes", certs, port=free_port()) as fed:
        fed.start_superlink(tmp_path / "coordinator" / "state.db")
        admissions = Admissions(tmp_path / "coordinator", fed.address)
        node = {n: admissions.admit(keys / f"{n}.pub") for n in names}
        assert admissions.revoke("intruder") == node["intruder"]
        for n in names[:3]:
            fed.start_supernode(n, data / n, keys / n, free_port())
        intruder = fed.start_supernode("intruder", data / "site-0", keys / "intruder", free_port(), max_retries=2)
        wrong_ca = fed.start_supernode("wrong-ca", data / "site-0", keys / "site-0", free_port(), ca=foreign_ca,
                                       max_retries=2)
        t0 = time.time()
        assert wrong_ca.wait(timeout=60) != 0 and time.time() - t0 < 60
        assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "processes" / "wrong-ca.log").read_text()
        assert intruder.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "processes" / "intruder.log").read_text()
        assert sorted(fed.wait_online(admissions, 3)) == sorted(node[n] for n in names[:3])
        # The server scores on its test set; the sites' own evaluation and SHAP would start 9 more processes.
        # Local DP, and a run config that points the ledgers at an empty folder: each hospital keeps its own.
        fed.run({"federation.rounds": 2, "train.steps": 3, "federation.min_sites": 3,
                 "federation.fraction_evaluate": 0.0, "report.shap_rows": 0,
                 "server.eval_data": str(data / "holdout"), "privacy.mode": "local",
                 "privacy.ledger_dir": str(tmp_path / "coordinators-choice")}, tmp_path / "run",
                echo=lambda line: None)
    assert processes_mentioning(str(tmp_path)) == []  # SuperLink, SuperExec, SuperNodes, ClientApps: all stopped
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["sites"] == ["site-0", "site-1", "site-2"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and not any("failed" in r for r in metrics["rounds"])
    assert all(math.isfinite(r["train_loss"]) and "central" in r for r in metrics["rounds"])
    final = metrics["final"]
    assert final["source"] == "central" and math.isfinite(final["macro_auc"])
    assert not (tmp_path / "coordinators-choice").exists()
    for n in names[:3]:  # where the hospital keeps it: <data-dir>/.fedfuse-privacy, holding both rounds
        [path] = (data / n / ".fedfuse-privacy").glob("ledger-*.json")
        ledger = read_ledger(path)
        assert ledger["site"] == n and sum(steps for _, _, steps in ledger["history"]) == 2 * 3
        assert metrics["privacy"]["sites"][n]["epsilon"] == pytest.approx(epsilon(ledger["history"], 1e-5))
