"""Certificates and keys for the local control plane.

One self-signed CA issues every serving and client certificate; the service-account
tokens are signed with a separate key pair, as in a kubeadm cluster. ECDSA P-256 keys
keep generation in the milliseconds, which matters because every start makes fresh ones.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FRONT_PROXY_CLIENT = "front-proxy-client"
_VALIDITY = datetime.timedelta(days=365)
# Clocks of the processes that check the certificates are the same host clock, but a
# small back-dating keeps a certificate valid if it is read within the same second.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPki:
    """Paths of everything the components and clients need."""

    ca: KeyPair
    front_proxy_ca: KeyPair
    front_proxy_client: KeyPair
    apiserver: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    scheduler: KeyPair
    kwok: KeyPair
    service_account_key: Path
    service_account_pub: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _create_ca(directory: Path, stem: str, common_name: str) -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    _write_cert(cert, pair.cert)
    _write_key(key, pair.key)
    return pair, key, cert


def _issue(
    directory: Path,
    stem: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    server: bool,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> KeyPair:
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if dns_names or ip_addresses:
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = KeyPair(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    _write_cert(cert, pair.cert)
    _write_key(key, pair.key)
    return pair


def first_service_ip(service_cluster_ip_range: str) -> str:
    """The address the apiserver gives the `kubernetes` Service (first host of the range)."""
    network = ipaddress.ip_network(service_cluster_ip_range)
    return str(network.network_address + 1)


def create_pki(directory: Path, service_cluster_ip_range: str) -> ClusterPki:
    """Writes a fresh CA, component certificates and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_cert = _create_ca(directory, "ca", "kubetune-local-ca")
    # The aggregation layer's request-header CA must differ from the client CA, or any
    # client certificate could claim to be the front proxy.
    front_proxy_ca, fp_key, fp_cert = _create_ca(directory, "front-proxy-ca", "kubetune-local-front-proxy-ca")
    front_proxy_client = _issue(directory, "front-proxy-client", fp_key, fp_cert, _name(FRONT_PROXY_CLIENT), server=False)

    def client(stem: str, user: str, group: str | None = None) -> KeyPair:
        return _issue(directory, stem, ca_key, ca_cert, _name(user, group), server=False)

    apiserver = _issue(
        directory,
        "apiserver",
        ca_key,
        ca_cert,
        _name("kube-apiserver"),
        server=True,
        dns_names=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ip_addresses=("127.0.0.1", first_service_ip(service_cluster_ip_range)),
    )
    sa_key = _new_key()
    sa_key_path = directory / "service-account.key"
    sa_pub_path = directory / "service-account.pub"
    _write_key(sa_key, sa_key_path)
    sa_pub_path.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return ClusterPki(
        ca=ca,
        front_proxy_ca=front_proxy_ca,
        front_proxy_client=front_proxy_client,
        apiserver=apiserver,
        # system:masters is bound to cluster-admin by the apiserver's bootstrap policy.
        admin=client("admin", "kubetune-admin", "system:masters"),
        # These user names are the subjects of the bootstrap RBAC bindings that grant the
        # components exactly what they need, as in a kubeadm cluster.
        controller_manager=client("controller-manager", "system:kube-controller-manager"),
        scheduler=client("scheduler", "system:kube-scheduler"),
        # kwok rewrites node and pod status and node leases of many objects; the local
        # cluster grants it full rights rather than maintain a role for a test double.
        kwok=client("kwok", "kwok-controller", "system:masters"),
        service_account_key=sa_key_path,
        service_account_pub=sa_pub_path,
    )


def issue_loopback_serving_cert(pki_dir: Path, stem: str, common_name: str) -> KeyPair:
    """A serving certificate for 127.0.0.1 signed by the cluster CA in `pki_dir` (made by create_pki): what a
    webhook server running next to the apiserver presents, so a caBundle of the cluster CA trusts it."""
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki_dir / 'ca.key'} is not the EC key create_pki writes")
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    return _issue(pki_dir, stem, ca_key, ca_cert, _name(common_name), server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",))
