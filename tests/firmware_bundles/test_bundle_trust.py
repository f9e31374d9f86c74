"""Trust root: thresholds count distinct keys, rotation needs old and new root, revocation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bundles import canonical
from firmware_bundles.errors import (
    FormatInvalid,
    MetadataExpired,
    SignatureInvalid,
    TrustInvalid,
)
from firmware_bundles.keyring import generate_keyset, load_keyset, root_chain, rotate_root
from firmware_bundles.keys import SigningKey, parse_envelope, sign_envelope
from firmware_bundles.trust import Role, Root, TrustStore, make_root, sign_root

NOW = 1_800_000_000
KEYS = [SigningKey.from_seed(bytes([i]) * 32) for i in range(1, 8)]


def _root(version=1, *, root_keys=KEYS[:3], root_threshold=2, release=KEYS[3:6],
          release_threshold=2, command=KEYS[6:7], expires=NOW + 1000) -> Root:
    return make_root(
        version=version,
        expires=expires,
        role_keys={
            Role.ROOT: [k.public for k in root_keys],
            Role.RELEASE: [k.public for k in release],
            Role.COMMAND: [k.public for k in command],
        },
        thresholds={Role.ROOT: root_threshold, Role.RELEASE: release_threshold},
    )


def _store() -> TrustStore:
    return TrustStore.from_root_bytes(sign_root(_root(), KEYS[:2]))


def _forge_duplicates(doc: dict, key: SigningKey, times: int) -> bytes:
    data = canonical.encode(doc)
    sig = key.sign(data).hex()
    return canonical.encode(
        {"signatures": [{"keyid": key.keyid, "sig": sig}] * times, "signed": doc}
    )


@given(times=st.integers(min_value=1, max_value=10))
@settings(max_examples=20, deadline=None)
def test_one_key_signing_many_times_counts_once(times):
    store = _store()
    data = _forge_duplicates({"type": "x"}, KEYS[3], times)
    with pytest.raises(SignatureInvalid, match="1 valid of 2"):
        store.verify(data, Role.RELEASE, now=NOW, max_size=1 << 20)


@given(
    signers=st.sets(st.sampled_from(range(len(KEYS)))),
)
@settings(max_examples=60, deadline=None)
def test_threshold_counts_distinct_keys_of_the_role_only(signers):
    store = _store()
    data = sign_envelope({"type": "x"}, [KEYS[i] for i in signers])
    release_signers = len(signers & {3, 4, 5})
    if release_signers >= 2:
        store.verify(data, Role.RELEASE, now=NOW, max_size=1 << 20)
    else:
        # keys of other roles (root, command) never count towards release
        with pytest.raises(SignatureInvalid):
            store.verify(data, Role.RELEASE, now=NOW, max_size=1 << 20)


def test_unknown_keys_and_bad_signatures_do_not_poison_a_quorum():
    store = _store()
    stranger = SigningKey.generate()
    doc = {"type": "x"}
    data = canonical.encode(doc)
    sigs = [
        {"keyid": stranger.keyid, "sig": stranger.sign(data).hex()},
        {"keyid": KEYS[5].keyid, "sig": KEYS[5].sign(b"other").hex()},
        {"keyid": KEYS[3].keyid, "sig": KEYS[3].sign(data).hex()},
        {"keyid": KEYS[4].keyid, "sig": KEYS[4].sign(data).hex()},
    ]
    store.verify(canonical.encode({"signatures": sigs, "signed": doc}), Role.RELEASE,
                 now=NOW, max_size=1 << 20)


def test_signature_over_other_bytes_is_refused():
    store = _store()
    data = sign_envelope({"type": "x", "n": 1}, KEYS[3:5])
    env = canonical.decode(data)
    env["signed"]["n"] = 2
    with pytest.raises(SignatureInvalid):
        store.verify(canonical.encode(env), Role.RELEASE, now=NOW, max_size=1 << 20)


def test_uppercase_hex_signature_is_refused():
    data = sign_envelope({"type": "x"}, [KEYS[3]]).decode()
    env = canonical.decode(data.encode())
    env["signatures"][0]["sig"] = env["signatures"][0]["sig"].upper()
    with pytest.raises(FormatInvalid):
        parse_envelope(canonical.encode(env))


def test_expired_trust_root_refuses_everything():
    store = _store()
    data = sign_envelope({"type": "x"}, KEYS[3:5])
    with pytest.raises(MetadataExpired):
        store.verify(data, Role.RELEASE, now=NOW + 1000, max_size=1 << 20)


def test_initial_root_must_be_signed_by_its_own_threshold():
    with pytest.raises(TrustInvalid, match="self-signed"):
        TrustStore.from_root_bytes(sign_root(_root(), KEYS[:1]))


def test_root_key_id_must_match_its_public_key():
    doc = _root().to_signed()
    kid = next(iter(doc["keys"]))
    doc["keys"][kid] = KEYS[6].public.to_json() if kid != KEYS[6].keyid else KEYS[5].public.to_json()
    with pytest.raises(TrustInvalid, match="key id"):
        TrustStore.from_root_bytes(sign_envelope(doc, KEYS[:3]))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["roles"].pop("command"), "exactly the roles"),
        (lambda d: d["roles"]["root"].update(threshold=0), "threshold"),
        (lambda d: d["roles"]["root"].update(threshold=4), "threshold"),
        (lambda d: d["roles"]["root"]["keyids"].append("ab" * 32), "does not list"),
        (lambda d: d.update(version=0), "version"),
        (lambda d: d.update(extra=1), "fields"),
    ],
    ids=["missing-role", "zero-threshold", "threshold-above-keys", "unknown-keyid", "v0", "extra"],
)
def test_malformed_root_is_refused(mutate, match):
    doc = _root().to_signed()
    mutate(doc)
    with pytest.raises(TrustInvalid, match=match):
        TrustStore.from_root_bytes(sign_envelope(doc, KEYS[:3]))


# ----------------------------------------------------------------------------- rotation


def test_rotation_signed_by_old_and_new_root_is_accepted():
    store = _store()
    new_root_keys = [SigningKey.generate() for _ in range(2)]
    v2 = _root(2, root_keys=new_root_keys, root_threshold=2)
    store.update_root(sign_root(v2, KEYS[:2] + new_root_keys))
    assert store.root.version == 2
    assert store.root.roles[Role.ROOT].keyids == {k.keyid for k in new_root_keys}


def test_rotation_signed_only_by_the_new_root_is_refused():
    store = _store()
    new_root_keys = [SigningKey.generate() for _ in range(2)]
    v2 = _root(2, root_keys=new_root_keys, root_threshold=2)
    with pytest.raises(TrustInvalid, match="old root"):
        store.update_root(sign_root(v2, new_root_keys))
    assert store.root.version == 1


def test_rotation_signed_only_by_the_old_root_is_refused():
    store = _store()
    new_root_keys = [SigningKey.generate() for _ in range(2)]
    v2 = _root(2, root_keys=new_root_keys, root_threshold=2)
    with pytest.raises(TrustInvalid, match="its own"):
        store.update_root(sign_root(v2, KEYS[:2] + new_root_keys[:1]))


def test_rotation_below_old_threshold_is_refused():
    store = _store()
    with pytest.raises(TrustInvalid, match="old root"):
        store.update_root(sign_root(_root(2), KEYS[:1]))


@pytest.mark.parametrize("version", [1, 3])
def test_rotation_must_increase_version_by_exactly_one(version):
    store = _store()
    with pytest.raises(TrustInvalid, match="does not follow"):
        store.update_root(sign_root(_root(version), KEYS[:3]))
    assert store.root.version == 1


def test_expired_intermediate_roots_still_chain():
    store = _store()
    v2 = sign_root(_root(2, expires=NOW - 5), KEYS[:3])
    v3 = sign_root(_root(3, expires=NOW + 5000), KEYS[:3])
    store.update_chain([v2, v3])
    assert store.root.version == 3
    store.check_fresh(NOW)


def test_revoked_release_key_no_longer_signs():
    store = _store()
    data = sign_envelope({"type": "x"}, [KEYS[3], KEYS[4]])
    store.verify(data, Role.RELEASE, now=NOW, max_size=1 << 20)
    # root v2 drops KEYS[3] from release; threshold 2 of {4, 5}
    v2 = _root(2, release=KEYS[4:6], release_threshold=2)
    store.update_root(sign_root(v2, KEYS[:3]))
    with pytest.raises(SignatureInvalid, match="1 valid of 2"):
        store.verify(data, Role.RELEASE, now=NOW, max_size=1 << 20)


# ----------------------------------------------------------------------------- key directories


def test_keyset_rotate_and_revoke_on_disk(tmp_path):
    keys_dir = tmp_path / "keys"
    ks = generate_keyset(keys_dir, now=NOW, root_keys=3, root_threshold=2)
    device = TrustStore.from_root_bytes((keys_dir / "trust.json").read_bytes())
    old_release = ks.signers(Role.RELEASE)
    old_data = sign_envelope({"type": "x"}, old_release)

    ks2 = rotate_root(keys_dir, now=NOW, replace=[Role.RELEASE])
    ks3 = rotate_root(keys_dir, now=NOW, revoke=[ks.keys[Role.ROOT][0].keyid])
    assert ks3.trust.root.version == 3
    assert len(ks3.trust.root.roles[Role.ROOT].keyids) == 2

    device.update_chain(root_chain(keys_dir, device.root.version))
    assert device.root.version == 3
    assert device.root_bytes == (keys_dir / "trust.json").read_bytes()
    with pytest.raises(SignatureInvalid):
        device.verify(old_data, Role.RELEASE, now=NOW, max_size=1 << 20)
    device.verify(sign_envelope({"type": "x"}, ks2.signers(Role.RELEASE)), Role.RELEASE,
                  now=NOW, max_size=1 << 20)
    assert load_keyset(keys_dir).signers(Role.RELEASE)[0].keyid != old_release[0].keyid


def test_revoking_below_threshold_is_refused(tmp_path):
    ks = generate_keyset(tmp_path / "k", now=NOW, root_keys=2, root_threshold=2)
    with pytest.raises(TrustInvalid, match="threshold"):
        rotate_root(tmp_path / "k", now=NOW, revoke=[ks.keys[Role.ROOT][0].keyid])
    assert load_keyset(tmp_path / "k").trust.root.version == 1


def test_keygen_refuses_to_overwrite_a_trust_root(tmp_path):
    generate_keyset(tmp_path / "k", now=NOW)
    with pytest.raises(FileExistsError):
        generate_keyset(tmp_path / "k", now=NOW)


def test_key_files_are_private(tmp_path):
    generate_keyset(tmp_path / "k", now=NOW)
    for path in (tmp_path / "k").glob("*.key"):
        assert path.stat().st_mode & 0o077 == 0
