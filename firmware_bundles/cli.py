"""``slotline bundle``: keygen, build, verify, inspect, apply, rotate-root.

Exit status: 0 on success; 1 when a bundle or trust file is refused; 3 on an I/O failure; 2 on a
usage error (click). A refusal prints exactly one line to stderr::

    error: bundle.signature_invalid: release signatures: 0 valid of 1 required

Imports of the library happen inside each command so ``slotline --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1
EXIT_IO = 3


def _fail(code: str, message: str, status: int) -> None:
    first_line = (message.splitlines() or [""])[0]
    click.echo(f"error: {code}: {first_line}", err=True)
    sys.exit(status)


def _refusals(func: F) -> F:
    """Turn library errors into one ``error: <code>: <message>`` line and an exit status."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from firmware_bundles.errors import BundleError, BundleRejected  # noqa: PLC0415

        try:
            return func(*args, **kwargs)
        except BundleRejected as e:
            _fail(e.code, str(e), EXIT_REFUSED)
        except BundleError as e:
            _fail(e.code, str(e), EXIT_IO)
        except FileExistsError as e:
            _fail("cli.exists", str(e), EXIT_IO)
        except OSError as e:
            _fail("transfer.error", f"{e.filename or ''}: {e.strerror or e}", EXIT_IO)
        return None

    return wrapper  # type: ignore[return-value]


def _now() -> int:
    return int(time.time())


def _trust(trust: Path, updates: tuple[Path, ...]) -> Any:
    from firmware_bundles.trust import TrustStore  # noqa: PLC0415

    return TrustStore.load(trust, updates)


@click.group()
def bundle() -> None:
    """Build, sign, verify, inspect and apply bundles (.slb)."""


@bundle.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Directory for the key files and trust.json (created).")
@click.option("--root-keys", default=1, show_default=True, help="Number of root keys (n).")
@click.option("--root-threshold", default=1, show_default=True, help="Root signatures needed (m).")
@click.option("--expires-days", default=3650, show_default=True, help="Lifetime of the root.")
@_refusals
def keygen(out_dir: Path, root_keys: int, root_threshold: int, expires_days: int) -> None:
    """Create a development key set (root, release, command) and DIR/trust.json."""
    from firmware_bundles.keyring import generate_keyset  # noqa: PLC0415
    from firmware_bundles.trust import Role  # noqa: PLC0415

    keyset = generate_keyset(
        out_dir,
        now=_now(),
        root_keys=root_keys,
        root_threshold=root_threshold,
        expires_days=expires_days,
    )
    for role in Role:
        ids = ", ".join(k.keyid[:16] for k in keyset.keys[role])
        click.echo(f"{role.value:8} {ids}")
    click.echo(f"trust root: {out_dir / 'trust.json'}")


def _parse_requires(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        component, sep, spec = value.partition("=")
        if not sep or not component or not spec:
            raise click.BadParameter(f"{value!r} is not COMPONENT=SPEC", param_hint="--requires")
        out[component] = spec
    return out


@bundle.command()
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The new image.")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The exact old image (makes a delta bundle).")
@click.option("--version", required=True, help="Release version, e.g. 2.1.0.")
@click.option("--hardware", multiple=True, required=True, help="Compatible model (repeatable).")
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Key directory from `bundle keygen`.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--component", default="rootfs", show_default=True, help="Slot class updated.")
@click.option("--security-version", default=0, show_default=True, type=int)
@click.option("--expires-days", default=365, show_default=True, type=int)
@click.option("--notes", default="", help="Release notes.")
@click.option("--requires", multiple=True, help="COMPONENT=SPEC (repeatable).")
@click.option("--bundle-id", default=None, help="Default: component-version-digest.")
@click.option("--chunk-size", default=None, type=int, help="Output bytes per chunk.")
@_refusals
def build(  # noqa: PLR0917 - click passes options positionally
    image: Path,
    base: Path | None,
    version: str,
    hardware: tuple[str, ...],
    keys_dir: Path,
    out: Path,
    component: str,
    security_version: int,
    expires_days: int,
    notes: str,
    requires: tuple[str, ...],
    bundle_id: str | None,
    chunk_size: int | None,
) -> None:
    """Encode and sign a bundle: full without --base, delta with it."""
    from firmware_bundles.bundle import build_bundle, verify_bundle  # noqa: PLC0415
    from firmware_bundles.keyring import load_keyset  # noqa: PLC0415
    from firmware_bundles.trust import Role  # noqa: PLC0415

    keyset = load_keyset(keys_dir)
    now = _now()
    started = time.monotonic()
    manifest = build_bundle(
        image,
        out,
        release_keys=keyset.signers(Role.RELEASE),
        version=version,
        hardware=hardware,
        now=now,
        base=base,
        component=component,
        security_version=security_version,
        expires=now + expires_days * 86400,
        notes=notes,
        requires=_parse_requires(requires),
        bundle_id=bundle_id,
        chunk_out_size=chunk_size,
    )
    # Never hand out a bundle our own trust root would refuse.
    verify_bundle(out, keyset.trust, now=now)
    size = out.stat().st_size
    click.echo(
        f"{manifest.bundle_id}: {manifest.payload.kind.value}, {len(manifest.payload.chunks)} "
        f"chunks, {size} bytes ({size / max(manifest.target.size, 1):.2%} of the image), "
        f"{time.monotonic() - started:.1f} s -> {out}"
    )


def _release_json(release: Any) -> dict[str, Any]:
    m = release.manifest
    return {
        "verified": True,
        "bundle_id": m.bundle_id,
        "component": m.component,
        "version": m.version,
        "security_version": m.security_version,
        "hardware": list(m.hardware),
        "target": m.target.to_json(),
        "payload_kind": release.payload.kind.value,
        "chunks": len(release.payload.chunks),
        "manifest_sha256": release.manifest_digest,
        "expires": m.expires,
    }


trust_option = click.option(
    "--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="trust.json (the trust root).")
update_option = click.option(
    "--root-update", "root_updates", multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="root.N.json rotations to apply to the trust root first, in order (repeatable).")
hardware_option = click.option("--hardware", default=None, help="Refuse unless built for MODEL.")
min_sv_option = click.option("--min-security-version", default=0, type=int, show_default=True,
                             help="Refuse bundles below this security version.")


@bundle.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@trust_option
@update_option
@hardware_option
@min_sv_option
@click.option("--decode", is_flag=True,
              help="Also decode every chunk and check the resulting image digest (no output).")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="The exact base image, for --decode of a delta bundle.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_refusals
def verify(  # noqa: PLR0917 - click passes options positionally
    file: Path,
    trust: Path,
    root_updates: tuple[Path, ...],
    hardware: str | None,
    min_security_version: int,
    decode: bool,
    base: Path | None,
    as_json: bool,
) -> None:
    """Check signatures, expiry and every chunk of FILE (no base needed).

    With --decode (and --base for a delta), also check the image it produces.
    """
    from firmware_bundles.bundle import verify_bundle  # noqa: PLC0415

    release = verify_bundle(
        file,
        _trust(trust, root_updates),
        now=_now(),
        hardware=hardware,
        min_security_version=min_security_version,
        decode=decode or base is not None,
        base_path=base,
    )
    if as_json:
        click.echo(json.dumps(_release_json(release), sort_keys=True))
    else:
        m = release.manifest
        click.echo(
            f"verified: {m.bundle_id} {m.component} {m.version} "
            f"({release.payload.kind.value}, {len(release.payload.chunks)} chunks)"
        )


@bundle.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_refusals
def inspect(file: Path, as_json: bool) -> None:
    """Show what FILE claims to be. Not a verification: use `bundle verify` for that."""
    from firmware_bundles.bundle import inspect_bundle  # noqa: PLC0415

    info = inspect_bundle(file)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"{file.name} (unverified)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    payload = info["payload"]
    rows = [
        ("bundle id", info["bundle_id"]),
        ("component", info["component"]),
        ("version", info["version"]),
        ("security version", str(info["security_version"])),
        ("hardware", ", ".join(info["hardware"])),
        ("target", f"{info['target']['size']} bytes sha256 {info['target']['sha256']}"),
        ("payload", (f"{payload['kind']}, {payload['chunks']} chunks, "
                     f"{payload['stored_size']} bytes, codec {payload['codec']}")),
        ("base", "-" if payload["base"] is None else (
            f"{payload['base']['size']} bytes sha256 {payload['base']['sha256']}")),
        ("requires", ", ".join(f"{k} {v}" for k, v in info["requires"].items()) or "-"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info["created"]))),
        ("expires", time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(info["expires"]))),
        ("signed by", ", ".join(k[:16] for k in info["signed_by"] if isinstance(k, str))),
        ("payload doc", "yes" if info["payload_doc"] else "no"),
        ("notes", info["notes"] or "-"),
    ]
    for field, value in rows:
        table.add_row(field, value)
    Console().print(table)


@bundle.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="The exact base image (required for delta bundles).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where the new image appears once verified.")
@trust_option
@update_option
@hardware_option
@min_sv_option
@_refusals
def apply(  # noqa: PLR0917 - click passes options positionally
    file: Path,
    base: Path | None,
    out: Path,
    trust: Path,
    root_updates: tuple[Path, ...],
    hardware: str | None,
    min_security_version: int,
) -> None:
    """Verify FILE and write the new image to --out (atomically; nothing on refusal)."""
    from firmware_bundles.bundle import apply_bundle  # noqa: PLC0415

    started = time.monotonic()
    release = apply_bundle(
        file,
        base,
        out,
        _trust(trust, root_updates),
        now=_now(),
        hardware=hardware,
        min_security_version=min_security_version,
    )
    click.echo(
        f"applied: {release.manifest.bundle_id} -> {out} ({release.target.size} bytes, "
        f"sha256 {release.target.sha256[:16]}..., {time.monotonic() - started:.1f} s)"
    )


@bundle.command("rotate-root")
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Key directory holding the current root keys.")
@click.option("--replace", multiple=True, type=click.Choice(["root", "release", "command"]),
              help="Replace every key of this role with a fresh one (repeatable).")
@click.option("--revoke", multiple=True, help="Drop this key id from the root (repeatable).")
@click.option("--expires-days", default=3650, show_default=True, type=int)
@_refusals
def rotate_root(
    keys_dir: Path, replace: tuple[str, ...], revoke: tuple[str, ...], expires_days: int
) -> None:
    """Write root N+1 (signed by old and new root keys): rotate keys or revoke them.

    Devices holding root N apply DIR/root.<N+1>.json; new devices get DIR/trust.json.
    """
    from firmware_bundles.keyring import rotate_root as rotate  # noqa: PLC0415
    from firmware_bundles.trust import Role  # noqa: PLC0415

    keyset = rotate(
        keys_dir,
        now=_now(),
        replace=[Role(r) for r in replace],
        revoke=revoke,
        expires_days=expires_days,
    )
    version = keyset.trust.root.version
    click.echo(f"root version {version}: {keys_dir / f'root.{version}.json'}")
    for role in Role:
        ids = ", ".join(sorted(k[:16] for k in keyset.trust.root.roles[role].keyids))
        click.echo(f"{role.value:8} {ids}")
