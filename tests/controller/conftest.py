"""Controller test plumbing: a fresh database per test (SQLite file or PostgreSQL schema)."""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agent.enroll_cli import make_csr
from controller.auth import Role
from controller.service import ControllerConfig, ControllerService, Principal
from firmware_bundles.bundle import build_bundle, hash_file
from firmware_bundles.keyring import generate_keyset
from firmware_bundles.trust import Role as TrustRole


class Clock:
    """Wall time the test moves by hand (the service takes any ``() -> float``)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pg_schema_url(pg_url: str) -> tuple[str, str]:
    schema = "t_" + uuid.uuid4().hex[:12]
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    return schema, f"{pg_url}?options=-csearch_path%3D{schema}"


def _drop_schema(pg_url: str, schema: str) -> None:
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    pg = request.getfixturevalue("pg_url")
    schema, url = _pg_schema_url(pg)
    yield url
    _drop_schema(pg, schema)


@pytest.fixture
def pg_db_url(pg_url):
    schema, url = _pg_schema_url(pg_url)
    yield url
    _drop_schema(pg_url, schema)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def svc(db_url, data_dir, clock):
    service = ControllerService(
        ControllerConfig(database_url=db_url, data_dir=data_dir, max_upload_bytes=4 * 1024**2),
        clock=clock,
    )
    yield service
    service.close()


class Fleet:
    """Real keys, a trust root, real .slb bundles, enrolled devices: the scaffolding of rollout
    tests (everything goes through the service's public methods)."""

    def __init__(self, svc, tmp_path, clock):
        self.svc, self.tmp, self.clock = svc, tmp_path, clock
        self.keys = generate_keyset(tmp_path / "keys", now=int(clock()) - 10)
        self.release_keys = self.keys.signers(TrustRole.RELEASE)
        svc.releases.provision(
            (tmp_path / "keys" / "trust.json").read_bytes(), self.keys.signers(TrustRole.COMMAND)[0]
        )

        self.ops = Principal("ops", Role.OPERATOR)

    def image(self, name, size=64 * 1024, seed=0):

        rng = random.Random(seed)
        path = self.tmp / f"{name}.img"
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
        return path

    def mutate(self, src, name, every=4096):
        data = bytearray(src.read_bytes())
        for i in range(0, len(data), every):
            data[i] ^= 0xFF
        path = self.tmp / f"{name}.img"
        path.write_bytes(bytes(data))
        return path

    def bundle(self, new, version, *, base=None, component="rootfs", models=("m1",), requires=None):

        out = self.tmp / f"{component}-{version}{'-d' if base else ''}.slb"
        build_bundle(
            new,
            out,
            release_keys=self.release_keys,
            version=version,
            hardware=list(models),
            now=int(self.clock()) - 5,
            base=base,
            component=component,
            requires=requires,
        )
        return out

    def upload(self, slb):

        spool = self.tmp / "spool.slb"
        shutil.copy(slb, spool)
        return self.svc.releases.add(self.ops, spool)

    def enroll(self, n, *, site="s1", model="m1", prefix="d", digest=None, versions=None, tags=()):

        ids = []
        for i in range(n):
            tok = self.svc.issue_enrollment_token(self.ops, site, model, tags=tags)["token"]
            did = f"{prefix}{i:04d}"
            self.svc.enroll(tok, did, f"SN{i}", model, make_csr(did)[1].decode())
            state = {"active_digest": digest} if digest else {}
            if versions:
                state["versions"] = versions
            self.svc.on_state(did, state)
            ids.append(did)
        self.svc.drain_reports()
        return ids


@pytest.fixture
def fleet(svc, tmp_path, clock):
    return Fleet(svc, tmp_path, clock)


@pytest.fixture
def release(fleet):
    """Releases 1.0 and 2.0 uploaded (2.0 with a delta from 1.0): base digests and 2.0's id."""
    v1 = fleet.image("v1", seed=1)
    v2 = fleet.mutate(v1, "v2")
    fleet.upload(fleet.bundle(v1, "1.0"))
    rel = fleet.upload(fleet.bundle(v2, "2.0"))
    return {"v1": hash_file(v1).sha256, "v2": hash_file(v2).sha256, "id": rel["bundle_id"]}


@pytest.fixture
def fleet_cls():
    """The Fleet helper class, for tests that build their own service."""
    return Fleet
