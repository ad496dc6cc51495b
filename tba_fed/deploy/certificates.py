"""Certificates and keys of a deployment, read with `cryptography` (Flower's own dependency).

Flower's rules: the SuperLink serves TLS with a certificate signed by a CA every site trusts; each
SuperNode signs with an EC key on a NIST curve stored in OpenSSH format, whose public half the
SuperLink has registered. Errors are `TBAInputError` naming the config field and the fix.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import TBAInputError
from ..federation.flower_internals import uses_nist_ec_curve

MAKE_CERTIFICATES = "scripts/make-certificates.sh"
OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"


def load_certificate(path: Path, field: str) -> x509.Certificate:
    fix = f"give the PEM file {MAKE_CERTIFICATES} wrote"
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as err:
        raise TBAInputError(field, f"cannot read {path} ({err.strerror})", fix) from None
    except ValueError as err:
        raise TBAInputError(field, f"{path} is not a PEM certificate ({err})", fix) from None


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.timezone.utc)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def validity_error(cert: x509.Certificate, path: Path, field: str, expiry_days: float) -> TBAInputError | None:
    """Not yet valid, expired, or expiring within `expiry_days`: the error to report, else None."""
    now = dt.datetime.now(dt.timezone.utc)
    renew = f"issue a new certificate ({MAKE_CERTIFICATES}) and restart the SuperLink"
    if cert.not_valid_before_utc > now:
        return TBAInputError(field, f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                             "check this machine's clock, or issue a certificate valid now")
    if cert.not_valid_after_utc <= now:
        return TBAInputError(field, f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}", renew)
    left = days_left(cert, now)
    if left < expiry_days:
        return TBAInputError(field, f"{path} expires on {cert.not_valid_after_utc:%Y-%m-%d}, in {int(left)} days "
                                    f"(less than {expiry_days:g})", renew)
    return None


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if `ca` signed `cert` (signature and issuer name)."""
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def covers_host(cert: x509.Certificate, host: str) -> bool:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in (n.lower() for n in names.get_values_for_type(x509.DNSName))


def key_matches_certificate(keyfile: Path, cert: x509.Certificate, field: str) -> bool:
    try:
        key = serialization.load_pem_private_key(Path(keyfile).read_bytes(), password=None)
    except OSError as err:
        raise TBAInputError(field, f"cannot read {keyfile} ({err.strerror})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise TBAInputError(field, f"{keyfile} is not an unencrypted PEM private key ({err})") from None
    return key.public_key() == cert.public_key()


def load_auth_private_key(path: Path, field: str) -> ec.EllipticCurvePrivateKey:
    """A SuperNode's private key as flower-supernode needs it: OpenSSH format, EC on a NIST curve."""
    fix = "make the site's kit with tba-fed site init DIR, which generates it at the site"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TBAInputError(field, f"cannot read {path} ({err.strerror})", fix) from None
    if not data.lstrip().startswith(OPENSSH_PRIVATE):
        raise TBAInputError(field, f"{path} is not an OpenSSH private key", fix)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise TBAInputError(field, f"{path} cannot be read as an unencrypted OpenSSH key ({err})", fix) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not uses_nist_ec_curve(key.public_key()):
        raise TBAInputError(field, f"{path} is not an EC key on a NIST curve ({type(key).__name__})", fix)
    return key


def load_auth_public_key(path: Path, field: str) -> ec.EllipticCurvePublicKey:
    """A SuperNode's public key as `flwr supernode register` reads it (OpenSSH, EC, NIST curve)."""
    fix = "use the .key.pub file the site sent (tba-fed site init wrote it beside the site's key)"
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TBAInputError(field, f"cannot read {path} ({err.strerror})", fix) from None
    if OPENSSH_PRIVATE in data or b"PRIVATE KEY-----" in data:
        raise TBAInputError(field, f"{path} is a private key: a site's private key never leaves the site",
                            "delete this copy, and ask the site for its public key (the .key.pub tba-fed site init "
                            "printed)")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise TBAInputError(field, f"{path} is not an OpenSSH public key ({err})", fix) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise TBAInputError(field, f"{path} is not an EC key on a NIST curve", fix)
    return key


def tls_context(ca_certfile: Path, field: str) -> ssl.SSLContext:
    """A client context that trusts only `ca_certfile` and checks host names."""
    try:
        return ssl.create_default_context(cafile=str(ca_certfile))
    except OSError as err:  # ssl.SSLError included
        raise TBAInputError(field, f"cannot load the CA certificate {ca_certfile} ({describe_os_error(err)})",
                            f"give the ca.crt {MAKE_CERTIFICATES} wrote") from None


def tls_handshake(address: str, context: ssl.SSLContext, timeout: float = 10.0) -> str:
    """Connect to host:port and complete a TLS handshake that verifies the server's certificate with
    `context` (tls_context) and its host name; return the TLS version. Raises OSError (ssl.SSLError included)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    with socket.create_connection((host, int(port)), timeout=timeout) as sock, \
            context.wrap_socket(sock, server_hostname=host) as tls:
        return str(tls.version())


def describe_os_error(err: OSError) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, socket.timeout):
        return "timed out"
    return err.strerror or str(err)
