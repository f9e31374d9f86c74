"""Enrollment: single use, expiry, scope, concurrency, certificates and revocation."""

from __future__ import annotations

import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.testclient import TestClient

from agent.enroll_cli import make_csr
from controller.api.app import create_app
from controller.auth import Role
from controller.errors import Conflict, EnrollmentRefused, Forbidden, InvalidInput
from controller.service import ControllerConfig, ControllerService, Principal

OPS = Principal("ops", Role.OPERATOR)


def _csr(device_id="gw-1"):
    return make_csr(device_id)[1].decode()


def test_enrolled_device_gets_cert_with_its_id_and_appears_with_scope(svc):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1", tags=["lab"])["token"]
    r = svc.enroll(tok, "gw-1", "SN123", "gw-x1", _csr("whatever-the-device-asks"))
    cert = x509.load_pem_x509_certificate(r.certificate_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    assert cert.issuer == x509.load_pem_x509_certificate(r.ca_pem.encode()).subject
    dev = svc.get_device(OPS, "gw-1")
    assert (dev["site"], dev["hardware_model"], dev["serial"], dev["tags"]) == (
        "berlin",
        "gw-x1",
        "SN123",
        ["lab"],
    )


def test_reused_token_is_refused(svc):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    svc.enroll(tok, "gw-1", "SN1", "gw-x1", _csr())
    with pytest.raises(EnrollmentRefused, match="already used"):
        svc.enroll(tok, "gw-2", "SN2", "gw-x1", _csr())


def test_expired_token_is_refused(svc, clock):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1", ttl_seconds=60)["token"]
    clock.now += 61
    with pytest.raises(EnrollmentRefused, match="expired"):
        svc.enroll(tok, "gw-1", "SN1", "gw-x1", _csr())


def test_token_for_other_hardware_model_is_refused_and_stays_usable(svc):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    with pytest.raises(EnrollmentRefused, match="hardware model"):
        svc.enroll(tok, "gw-1", "SN1", "other-model", _csr())
    svc.enroll(tok, "gw-1", "SN1", "gw-x1", _csr())


def test_unknown_and_malformed_tokens_are_refused(svc):
    with pytest.raises(EnrollmentRefused):
        svc.enroll("sle_" + "x" * 43, "gw-1", "SN1", "gw-x1", _csr())
    with pytest.raises(EnrollmentRefused):
        svc.enroll("not-a-token", "gw-1", "SN1", "gw-x1", _csr())


@pytest.mark.parametrize("bad", ["a+b", "a#", "a/b", "$SYS", "a\x00b", "", "../x", "x" * 65, "*"])
def test_device_ids_unsafe_for_topics_are_refused(svc, bad):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    with pytest.raises(InvalidInput):
        svc.enroll(tok, bad, "SN1", "gw-x1", _csr())
    svc.enroll(tok, "gw-ok", "SN1", "gw-x1", _csr())  # the refused attempt used nothing


@pytest.mark.parametrize(
    "reserved", ["relay-berlin", "relay-other-site", "Relay-berlin", "bridge-berlin", "controller"]
)
def test_relay_and_broker_identities_cannot_be_enrolled(svc, reserved):
    """A device enrolled as relay-<site> would hold that relay's certificate and be served every
    chunk offered to the site (controller/releases.py); bridge/controller CNs have ACL rights over
    every device's topics. Refused before the token is consumed."""
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    with pytest.raises(InvalidInput, match="reserved") as e:
        svc.enroll(tok, reserved, "SN1", "gw-x1", _csr())
    assert e.value.code == "enroll.device_id_reserved"
    assert svc.list_devices(OPS) == []
    svc.enroll(tok, "relayer-1", "SN1", "gw-x1", _csr())  # the token is still unused


def test_fleet_ca_never_signs_a_device_csr_as_a_relay(svc):
    with pytest.raises(InvalidInput, match="reserved"):
        svc.ca.sign_csr(_csr(), "relay-berlin")


def test_enrolling_a_relay_id_through_the_api_is_a_422_with_its_code(svc):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    body = {"token": tok, "serial": "SN1", "hardware_model": "gw-x1", "csr_pem": _csr()}
    with TestClient(create_app(svc)) as client:
        r = client.post("/api/v1/enroll", json={**body, "device_id": "relay-berlin"})
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "enroll.device_id_reserved"
        assert "reserved" in r.json()["message"]
        assert client.post("/api/v1/enroll", json={**body, "device_id": "gw-1"}).status_code == 200


def test_duplicate_device_id_leaves_token_unused(svc):
    t1 = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    t2 = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    svc.enroll(t1, "gw-1", "SN1", "gw-x1", _csr())
    with pytest.raises(Conflict):
        svc.enroll(t2, "gw-1", "SN2", "gw-x1", _csr())
    svc.enroll(t2, "gw-2", "SN2", "gw-x1", _csr())


def test_garbage_csr_is_refused(svc):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    with pytest.raises(InvalidInput):
        svc.enroll(tok, "gw-1", "SN1", "gw-x1", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")


def test_field_engineer_issues_tokens_for_own_sites_only(svc):
    fe = Principal("fe", Role.FIELD_ENGINEER, ("berlin",))
    svc.issue_enrollment_token(fe, "berlin", "gw-x1")
    with pytest.raises(Forbidden):
        svc.issue_enrollment_token(fe, "paris", "gw-x1")


def test_decommission_revokes_certificate_in_crl(svc, data_dir):
    tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
    r = svc.enroll(tok, "gw-1", "SN1", "gw-x1", _csr())
    serial = x509.load_pem_x509_certificate(r.certificate_pem.encode()).serial_number
    svc.decommission(OPS, "gw-1")
    crl = x509.load_pem_x509_crl((data_dir / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert not svc.known_device("gw-1")
    assert any(
        a["action"] == "device.decommission" and a["actor"] == "ops" for a in svc.audit_log()
    )


@pytest.mark.postgres
def test_concurrent_reuse_on_postgres_yields_exactly_one_success(pg_db_url, data_dir):
    svc = ControllerService(ControllerConfig(database_url=pg_db_url, data_dir=data_dir))
    try:
        tok = svc.issue_enrollment_token(OPS, "berlin", "gw-x1")["token"]
        csrs = [_csr(f"gw-{i}") for i in range(16)]
        barrier = threading.Barrier(16)
        results: list[str] = []

        def attempt(i):
            barrier.wait()
            try:
                svc.enroll(tok, f"gw-{i}", f"SN{i}", "gw-x1", csrs[i])
                results.append("ok")
            except EnrollmentRefused:
                results.append("refused")

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["ok"] + ["refused"] * 15
        assert len(svc.list_devices(OPS)) == 1
    finally:
        svc.close()
