"""Test certificates: a CA, a server certificate for 127.0.0.1 and a client certificate."""

from __future__ import annotations

from pathlib import Path


def write_certificates(tmp_path: Path) -> dict[str, Path]:
    """PEM files, all signed by the CA: ca.pem/.key, server.pem/.key (for 127.0.0.1),
    client.pem/.key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(common_name, key, issuer_name, issuer_key, *, ca=False, san=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}

    def write(name, key, cert):
        files[f"{name}.key"] = tmp_path / f"{name}.key"
        files[f"{name}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        files[f"{name}.pem"] = tmp_path / f"{name}.pem"
        files[f"{name}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    write("ca", ca_key, issue("test CA", ca_key, ca_name, ca_key, ca=True))
    for name, san in [("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", None)]:
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, issue(name, key, ca_name, ca_key, san=san))
    return files
