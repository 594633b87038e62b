"""The rpc-worker's identity: a self-signed certificate made on first start,
a token, and the fingerprint the coordinator pins.

There is no certificate authority: the coordinator's profile holds the
certificate's SHA-256 fingerprint and refuses any other certificate, so a
machine that takes over the worker's address learns nothing (it never gets
the token, which is sent only after the certificate matched).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from tightwad_core.runtime.atomic import write_bytes


def default_state_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tightwad" / "rpc-worker"


def fingerprint(der: bytes) -> str:
    """``sha256:<64 hex digits>`` of a DER certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``sha256:ab12...``, ``AB:12:...`` or bare hex; ValueError otherwise."""
    hexpart = re.sub(r"[\s:]", "", text.strip().lower().removeprefix("sha256:"))
    if not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise ValueError(f"bad certificate fingerprint {text!r}: expected 'sha256:' and 64 hex "
                         "digits, as `tightwad rpc-worker` prints it")
    return "sha256:" + hexpart


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    fingerprint: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def load_or_create(state_dir: Path) -> Identity:
    """The worker's certificate and key in ``state_dir``, made on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    cert_path, key_path = state_dir / "cert.pem", state_dir / "key.pem"
    if not (cert_path.is_file() and key_path.is_file()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"tightwad rpc-worker on {socket.gethostname()}"[:64])])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .sign(key, hashes.SHA256()))
        write_bytes(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), mode=0o600)
        write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    return Identity(cert_path, key_path, fingerprint(der))


def load_or_create_token(state_dir: Path) -> str:
    """The token in ``state_dir/token``, made on first use (mode 0600)."""
    path = state_dir / "token"
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(path, secrets.token_urlsafe(32).encode() + b"\n", mode=0o600)
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"the token in {path} is shorter than 16 characters")
    return token
