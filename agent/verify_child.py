"""Signed commands verified in a short-lived child process, so the daemon never loads crypto.

Why: Ed25519 verification loads ``cryptography`` (its Rust extension with OpenSSL inside, about
8.5 MiB of RSS that no CPython module unload gives back). ``slotline agent run`` is idle almost
all the time and receives a handful of commands per update, so it hands each one to a fresh
``python -m agent.verify_child`` (about 0.2 s and 25 MiB, for the time of one verification) and
stays at its idle size. The same step puts the parsing of hostile bytes (command JSON, base64,
signatures, the embedded manifest and payload table) in a process that holds no slot handle, no
journal lock and no socket: it gets everything on stdin and answers on stdout.

Rules:
- The checks are ``agent.verify.BundleVerifier``'s, unchanged; the child only runs them.
- One request, one reply, exit. The request carries the trust root's bytes (read once by the
  daemon at start-up), the raw command and the two device facts the checks need
  (``last_counter``, committed ``security_version``) plus ``now``.
- A refusal comes back with its stable code (``bundle.signature_invalid``...). A child that
  cannot start, crashes, hangs past ``timeout`` or answers garbage makes the command refused with
  ``agent.verifier_failed``: never accepted. The child is killed on timeout or cancellation.
- The daemon validates the reply's shape (``Release`` and ``ChunkSpec`` check themselves).

    verifier = ChildVerifier(trust_root_bytes, device_id="dev-1", hardware="board-x")
    cmd = await verifier.verify(raw, agent.state, now)   # AgentError/BundleError on refusal
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from agent.core.states import AgentState, ChunkSpec, PayloadKind, Release
from agent.errors import AgentError, VerifierFailed
from agent.ports import VerifiedCommand

DEFAULT_TIMEOUT = 60.0  # seconds: a slow board's interpreter start plus one verification
ACTIONS = ("install", "cancel", "rollback", "config")


def child_argv() -> list[str]:
    """The child's command line: this interpreter, ``-P`` (no working directory on sys.path)."""
    return [sys.executable, "-P", "-m", "agent.verify_child"]


class ChildVerifier:
    """The daemon's ``CommandVerifier``: every command is checked by a fresh child process."""

    def __init__(
        self,
        trust_root: bytes,
        *,
        device_id: str,
        hardware: str,
        timeout: float = DEFAULT_TIMEOUT,
        argv: Sequence[str] | None = None,
    ) -> None:
        self._root = trust_root
        self._device = device_id
        self._hardware = hardware
        self._timeout = timeout
        self._argv = list(argv) if argv is not None else child_argv()

    async def verify(self, raw: bytes, state: AgentState, now: float) -> VerifiedCommand:
        """Verify ``raw`` in a child.

        Raises:
            AgentError: the child refused the command (its code: ``bundle.*``,
                ``command.rejected``...) or failed (``agent.verifier_failed``).
        """
        import asyncio  # noqa: PLC0415 - loaded in the daemon already; the child never needs it

        request = encode_request(
            trust_root=self._root,
            raw=raw,
            device_id=self._device,
            hardware=self._hardware,
            last_counter=state.last_counter,
            security_version=state.security_version,
            now=now,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd="/",
            )
        except OSError as e:  # no memory, no process slot, interpreter gone: refuse, run on
            raise VerifierFailed(f"cannot start the command verifier: {e}") from e
        try:
            out, _ = await asyncio.wait_for(proc.communicate(request), self._timeout)
        except TimeoutError:
            msg = f"command verifier gave no answer in {self._timeout:.0f} s"
            raise VerifierFailed(msg) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: never leave it behind
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise VerifierFailed(f"command verifier exited with status {proc.returncode}")
        return decode_reply(out)


def encode_request(
    *,
    trust_root: bytes,
    raw: bytes,
    device_id: str,
    hardware: str,
    last_counter: int,
    security_version: int,
    now: float,
) -> bytes:
    """The request document (JSON; bytes as base64)."""
    return json.dumps(
        {
            "trust_root": base64.b64encode(trust_root).decode(),
            "raw": base64.b64encode(raw).decode(),
            "device": device_id,
            "hardware": hardware,
            "last_counter": last_counter,
            "security_version": security_version,
            "now": now,
        }
    ).encode()


def release_doc(r: Release) -> dict[str, Any]:
    """A :class:`Release` as JSON-able data (inverse: :func:`release_from_doc`)."""
    return {
        "bundle_id": r.bundle_id,
        "version": r.version,
        "security_version": r.security_version,
        "target_size": r.target_size,
        "target_sha256": r.target_sha256,
        "kind": r.kind.value,
        "chunks": [[c.size, c.sha256, c.out_size] for c in r.chunks],
        "base_sha256": r.base_sha256,
        "base_size": r.base_size,
        "rollout": r.rollout,
    }


def _typed(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{key}: {type(value).__name__}")
    return value


def release_from_doc(d: Mapping[str, Any]) -> Release:
    """Inverse of :func:`release_doc`; ``KeyError``/``TypeError``/``ValueError`` on bad shapes."""
    opt_str = (str, type(None))
    return Release(
        bundle_id=_typed(d, "bundle_id", str),
        version=_typed(d, "version", str),
        security_version=_typed(d, "security_version", int),
        target_size=_typed(d, "target_size", int),
        target_sha256=_typed(d, "target_sha256", str),
        kind=PayloadKind(_typed(d, "kind", str)),
        chunks=tuple(
            ChunkSpec(int(size), str(sha), int(out)) for size, sha, out in _typed(d, "chunks", list)
        ),
        base_sha256=_typed(d, "base_sha256", opt_str),
        base_size=_typed(d, "base_size", (int, type(None))),
        rollout=_typed(d, "rollout", opt_str),
    )


def encode_reply(result: VerifiedCommand | AgentError | Exception) -> bytes:
    """The child's answer: the verified command, or the refusal's code and message."""
    if isinstance(result, VerifiedCommand):
        doc: dict[str, Any] = {
            "action": result.action,
            "counter": result.counter,
            "release": None if result.release is None else release_doc(result.release),
        }
    else:
        code = getattr(result, "code", "command.rejected")
        doc = {"error": {"code": str(code), "message": str(result)}}
    return json.dumps(doc).encode()


def decode_reply(out: bytes) -> VerifiedCommand:
    """The verified command from the child's answer.

    Raises:
        AgentError: the refusal the child reported, with its code.
        VerifierFailed: the answer is not a well-formed reply.
    """
    try:
        result = _parse_reply(json.loads(out))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise VerifierFailed(f"command verifier answered garbage: {e}") from None
    if isinstance(result, AgentError):
        raise result
    return result


def _parse_reply(doc: Any) -> VerifiedCommand | AgentError:
    if "error" in doc:
        err = doc["error"]
        return AgentError(_typed(err, "message", str), code=_typed(err, "code", str))
    action = _typed(doc, "action", str)
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    release = doc["release"]
    return VerifiedCommand(
        action,
        _typed(doc, "counter", int),
        None if release is None else release_from_doc(release),
    )


def main() -> None:
    """Child side: read one request from stdin, verify, write the reply to stdout."""
    from agent.verify import make_verifier  # noqa: PLC0415 - the heavy part, child only
    from firmware_bundles.errors import BundleError  # noqa: PLC0415

    req = json.loads(sys.stdin.buffer.read())
    result: VerifiedCommand | AgentError | Exception
    try:
        verifier = make_verifier(
            base64.b64decode(req["trust_root"]), device_id=req["device"], hardware=req["hardware"]
        )
        result = verifier.verify_facts(
            base64.b64decode(req["raw"]),
            last_counter=int(req["last_counter"]),
            security_version=int(req["security_version"]),
            now=float(req["now"]),
        )
    except (BundleError, AgentError) as e:
        result = e
    sys.stdout.buffer.write(encode_reply(result))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
