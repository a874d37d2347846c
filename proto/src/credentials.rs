//! Checks of a client's own files (CA bundle, certificate, key) before it
//! connects.
//!
//! A TLS handshake that fails says little ("bad certificate", "connection
//! closed") and never which file is at fault; most mistakes are visible in
//! the files themselves. The CLI and the mount both run [`check_client_files`]
//! on what they read, so a key given as `--ca`, a CSR given as `--cert`, a
//! key that belongs to another certificate, an expired certificate or a
//! server certificate used as a client's are named, with the fix, before
//! anything goes over the network.
//!
//! Some findings are hints, not refusals ([`FileWarning`]): a client
//! certificate that does not chain to `--ca` is right when the server also
//! trusts the client's own CA (`server run --client-ca`), and a private key
//! others can read still works.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    UnixTime,
};
use zeroize::Zeroizing;

use crate::cert::{expiry_notice, from_unix, rfc3339_unix, to_unix, ExpiryNotice};

/// Which of the three files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `--ca`: the CA that signed the server's certificate.
    Ca,
    /// `--cert`: this identity's client certificate.
    Cert,
    /// `--key`: this identity's private key.
    Key,
}

impl Role {
    fn what(self) -> &'static str {
        match self {
            Role::Ca => "CA certificate",
            Role::Cert => "client certificate",
            Role::Key => "client key",
        }
    }

    /// The flag and environment variable that name the file.
    pub fn flag(self) -> &'static str {
        match self {
            Role::Ca => "--ca/SECRETFS_CA",
            Role::Cert => "--cert/SECRETFS_CERT",
            Role::Key => "--key/SECRETFS_KEY",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Role::Ca | Role::Cert => "a certificate (-----BEGIN CERTIFICATE-----)",
            Role::Key => "a private key (-----BEGIN PRIVATE KEY-----)",
        }
    }

    /// Which file the flag wants, as `server init` and `client add` name them.
    fn pointer(self) -> &'static str {
        match self {
            Role::Ca => "give the CA certificate as --ca: ca.pem, written by `secretfs server init` and `secretfs client add`",
            Role::Cert => "give the client certificate as --cert: NAME.pem, written by `secretfs client add` (admin.pem for the first admin)",
            Role::Key => "give the client's private key as --key: NAME.key, written by `secretfs client add` next to NAME.pem (admin.key for the first admin)",
        }
    }
}

/// What a PEM file holds, in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Certificate,
    PrivateKey,
    CertificateRequest,
    PublicKey,
    RevocationList,
    Other,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Found::Certificate => "a certificate",
            Found::PrivateKey => "a private key",
            Found::CertificateRequest => "a certificate request (CSR)",
            Found::PublicKey => "a public key",
            Found::RevocationList => "a certificate revocation list",
            Found::Other => "something other than a certificate or key",
        })
    }
}

/// A file that cannot work: which file, what is wrong ([`fmt::Display`])
/// and what to do ([`FileError::hint`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("the {} {} (given by {}) is empty", .role.what(), .path.display(), .role.flag())]
    Empty { role: Role, path: PathBuf },
    #[error("the {} {} (given by {}) is not a PEM file: it has no -----BEGIN ...----- block", .role.what(), .path.display(), .role.flag())]
    NotPem { role: Role, path: PathBuf },
    #[error("the {} {} (given by {}) holds {found}, not {}", .role.what(), .path.display(), .role.flag(), .role.expected())]
    WrongKind {
        role: Role,
        path: PathBuf,
        found: Found,
    },
    #[error("the client key {} (given by --key/SECRETFS_KEY) is encrypted", .path.display())]
    EncryptedKey { path: PathBuf },
    #[error("the {} {} (given by {}) cannot be read as a certificate: {detail}", .role.what(), .path.display(), .role.flag())]
    BadCertificate {
        role: Role,
        path: PathBuf,
        detail: String,
    },
    #[error("the client key {} (given by --key/SECRETFS_KEY) cannot be used: {detail}", .path.display())]
    UnusableKey { path: PathBuf, detail: String },
    #[error("the client key {} does not belong to the client certificate {} (--key and --cert are from different pairs)", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the client certificate {} (given by --cert/SECRETFS_CERT) expired at {not_after}", .path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("the client certificate {} (given by --cert/SECRETFS_CERT) is not valid until {not_before}", .path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("the certificate {} (given by --cert/SECRETFS_CERT) is not for client authentication: its extended key usage lacks clientAuth (is it a server certificate?)", .path.display())]
    NoClientAuth { path: PathBuf },
    #[error("the certificate {} (given by --cert/SECRETFS_CERT) is a CA certificate, not a client's", .path.display())]
    CaAsClient { path: PathBuf },
    #[error("the CA certificate {} (given by --ca/SECRETFS_CA) holds no CA certificate: {subject} is a client's or a server's certificate", .path.display())]
    NotACa { path: PathBuf, subject: String },
}

impl FileError {
    /// What to do about it.
    pub fn hint(&self) -> String {
        match self {
            FileError::Empty { role, .. } | FileError::NotPem { role, .. } => {
                role.pointer().to_owned()
            }
            FileError::WrongKind { role, found, .. } => match (role, found) {
                (Role::Ca, Found::PrivateKey) => format!(
                    "that is a private key: {}; keep keys out of --ca",
                    Role::Ca.pointer()
                ),
                (Role::Cert, Found::CertificateRequest) => {
                    "a CSR must be signed first: `secretfs client add NAME --csr FILE` writes the certificate; give that as --cert".to_owned()
                }
                (Role::Cert, Found::PrivateKey) | (Role::Key, Found::Certificate) => {
                    "were --cert and --key swapped? --cert takes NAME.pem, --key takes NAME.key".to_owned()
                }
                (role, _) => role.pointer().to_owned(),
            },
            FileError::EncryptedKey { path } => format!(
                "secretfs needs an unencrypted key: decrypt it (`openssl pkey -in {0} -out NEW.key`), keep it mode 0600, and give NEW.key as --key",
                path.display()
            ),
            FileError::BadCertificate { role, .. } => role.pointer().to_owned(),
            FileError::UnusableKey { .. } => {
                "give an ECDSA (P-256, P-384), Ed25519 or RSA private key in PEM (PKCS#8, SEC1 or PKCS#1), such as the NAME.key `secretfs client add` writes".to_owned()
            }
            FileError::KeyMismatch { .. } => {
                "give the key made with this certificate (NAME.key next to NAME.pem from `secretfs client add`); a reissued certificate comes with its own new key".to_owned()
            }
            FileError::Expired { .. } => {
                "an expired certificate cannot be renewed by its holder: have an admin issue a new certificate for this client, then renew it before it expires".to_owned()
            }
            FileError::NotYetValid { .. } => {
                "check this machine's clock (and the issuing server's): the certificate was issued for a time that has not come yet".to_owned()
            }
            FileError::NoClientAuth { .. } => {
                "give a client certificate (NAME.pem from `secretfs client add`, admin.pem for the first admin), not server.pem".to_owned()
            }
            FileError::CaAsClient { .. } => {
                "give the client certificate as --cert (NAME.pem from `secretfs client add`, admin.pem for the first admin); ca.pem goes to --ca".to_owned()
            }
            FileError::NotACa { .. } => Role::Ca.pointer().to_owned(),
        }
    }

    /// The problem and the fix, in one line.
    pub fn explain(&self) -> String {
        format!("{self}; {}", self.hint())
    }
}

/// Something about the files worth saying that does not stop a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileWarning {
    /// A private key that the group or others may read.
    KeyReadableByOthers { path: PathBuf, mode: u32 },
    /// The client certificate does not chain to the CA given as `--ca`.
    NotIssuedByCa { cert: PathBuf, ca: PathBuf },
    /// The client certificate expires within 30 days. For an operator's
    /// command; a mount renews itself and warns on its own schedule.
    Expiring { cert: PathBuf, notice: ExpiryNotice },
}

impl fmt::Display for FileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileWarning::KeyReadableByOthers { path, mode } => write!(
                f,
                "the private key {} is readable by {} (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                if mode & 0o004 != 0 { "everyone" } else { "its group" },
                path.display()
            ),
            FileWarning::NotIssuedByCa { cert, ca } => write!(
                f,
                "the client certificate {} was not issued by the CA in {} (--ca/SECRETFS_CA); that is right only when the \
                 server trusts your own CA (`server run --client-ca`), otherwise give the certificate this server issued",
                cert.display(),
                ca.display()
            ),
            FileWarning::Expiring { cert, notice } => write!(
                f,
                "the client certificate {} {notice}; renew it with `secretfs client renew`",
                cert.display()
            ),
        }
    }
}

/// One file as read: where it came from and what it holds.
#[derive(Clone, Copy)]
pub struct FileContents<'a> {
    pub path: &'a Path,
    pub pem: &'a [u8],
}

/// The three files a client connects with.
#[derive(Clone, Copy)]
pub struct ClientFiles<'a> {
    pub ca: FileContents<'a>,
    pub cert: FileContents<'a>,
    pub key: FileContents<'a>,
}

/// Warns about a private key file the group or others may read. Returns
/// nothing when the file cannot be inspected (reading it reports that).
pub fn key_permissions(path: &Path) -> Option<FileWarning> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| FileWarning::KeyReadableByOthers {
        path: path.to_path_buf(),
        mode,
    })
}

/// Checks the files a client connects with, at time `now`. An error names
/// the file that cannot work; warnings are for the caller to log.
pub fn check_client_files(
    files: &ClientFiles<'_>,
    now: SystemTime,
) -> Result<Vec<FileWarning>, FileError> {
    let ca = sections(files.ca, Role::Ca)?;
    let cert = sections(files.cert, Role::Cert)?;
    let key = sections(files.key, Role::Key)?;
    let roots = certificates(&ca, files.ca.path, Role::Ca)?;
    if let Some(subject) = no_ca_among(&roots) {
        return Err(FileError::NotACa {
            path: files.ca.path.to_path_buf(),
            subject,
        });
    }
    let chain = certificates(&cert, files.cert.path, Role::Cert)?;
    let leaf = &chain[0];
    let parsed = parse_leaf(leaf, files.cert.path)?;
    pair_matches(&parsed, &key, files.cert.path, files.key.path)?;

    let now_secs = to_unix(now);
    let validity = parsed.validity();
    if now_secs > validity.not_after.timestamp() {
        return Err(FileError::Expired {
            path: files.cert.path.to_path_buf(),
            not_after: rfc3339_unix(validity.not_after.timestamp()),
        });
    }
    if now_secs < validity.not_before.timestamp() {
        return Err(FileError::NotYetValid {
            path: files.cert.path.to_path_buf(),
            not_before: rfc3339_unix(validity.not_before.timestamp()),
        });
    }
    if parsed.is_ca() {
        return Err(FileError::CaAsClient {
            path: files.cert.path.to_path_buf(),
        });
    }
    // No extension means any usage; present, it must allow client auth.
    if let Ok(Some(eku)) = parsed.extended_key_usage() {
        if !eku.value.client_auth && !eku.value.any {
            return Err(FileError::NoClientAuth {
                path: files.cert.path.to_path_buf(),
            });
        }
    }

    let mut warnings = Vec::new();
    if let Some(notice) = expiry_notice(from_unix(validity.not_after.timestamp()), now) {
        warnings.push(FileWarning::Expiring {
            cert: files.cert.path.to_path_buf(),
            notice,
        });
    }
    if !chains_to(&roots, &chain, now) {
        warnings.push(FileWarning::NotIssuedByCa {
            cert: files.cert.path.to_path_buf(),
            ca: files.ca.path.to_path_buf(),
        });
    }
    Ok(warnings)
}

/// One PEM section. Key material is wiped when dropped.
struct Section {
    kind: SectionKind,
    der: Zeroizing<Vec<u8>>,
}

impl PemObject for Section {
    fn from_pem(kind: SectionKind, der: Vec<u8>) -> Option<Self> {
        Some(Section {
            kind,
            der: Zeroizing::new(der),
        })
    }
}

fn found(kind: SectionKind) -> Found {
    match kind {
        SectionKind::Certificate => Found::Certificate,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
            Found::PrivateKey
        }
        SectionKind::Csr => Found::CertificateRequest,
        SectionKind::PublicKey => Found::PublicKey,
        SectionKind::Crl => Found::RevocationList,
        _ => Found::Other,
    }
}

/// Whether the key file holds the private key of the (first) certificate
/// of the certificate file, in any key format rustls reads (PKCS#8, SEC1,
/// PKCS#1). An error names the file at fault.
pub fn key_matches(cert: FileContents<'_>, key: FileContents<'_>) -> Result<(), FileError> {
    let cert_sections = sections(cert, Role::Cert)?;
    let key_sections = sections(key, Role::Key)?;
    let chain = certificates(&cert_sections, cert.path, Role::Cert)?;
    let parsed = parse_leaf(&chain[0], cert.path)?;
    pair_matches(&parsed, &key_sections, cert.path, key.path)
}

fn parse_leaf<'a>(
    leaf: &'a CertificateDer<'static>,
    path: &Path,
) -> Result<x509_parser::certificate::X509Certificate<'a>, FileError> {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, parsed)| parsed)
        .map_err(|e| FileError::BadCertificate {
            role: Role::Cert,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// Whether `key` (read from `key_path`) is the private key of `parsed`
/// (read from `cert_path`).
fn pair_matches(
    parsed: &x509_parser::certificate::X509Certificate<'_>,
    key: &[Section],
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), FileError> {
    let key = private_key(key, key_path)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        FileError::UnusableKey {
            path: key_path.to_path_buf(),
            detail: e.to_string(),
        }
    })?;
    // rustls makes the same comparison when it loads the pair; here it
    // names the files.
    if let Some(spki) = signer.public_key() {
        if spki.as_ref() != parsed.tbs_certificate.subject_pki.raw {
            return Err(FileError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Every PEM section of a file; an error for an empty or non-PEM file.
fn sections(file: FileContents<'_>, role: Role) -> Result<Vec<Section>, FileError> {
    let path = file.path.to_path_buf();
    if file.pem.iter().all(u8::is_ascii_whitespace) {
        return Err(FileError::Empty { role, path });
    }
    let found: Vec<Section> = Section::pem_slice_iter(file.pem)
        .filter_map(Result::ok)
        .collect();
    if found.is_empty() {
        // pki-types skips labels it does not know, such as this one. The
        // bytes are searched as they are: a lossy UTF-8 copy of a DER key
        // would be freed unwiped.
        const ENCRYPTED: &[u8] = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
        if file.pem.windows(ENCRYPTED.len()).any(|w| w == ENCRYPTED) {
            return Err(match role {
                Role::Key => FileError::EncryptedKey { path },
                _ => FileError::WrongKind {
                    role,
                    path,
                    found: Found::PrivateKey,
                },
            });
        }
        return Err(FileError::NotPem { role, path });
    }
    Ok(found)
}

/// The certificates among `sections`, in order (leaf first); an error when
/// there are none, naming what the file holds instead.
fn certificates(
    sections: &[Section],
    path: &Path,
    role: Role,
) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let certs: Vec<_> = sections
        .iter()
        .filter(|s| s.kind == SectionKind::Certificate)
        .map(|s| CertificateDer::from(s.der.to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(FileError::WrongKind {
            role,
            path: path.to_path_buf(),
            found: found(sections[0].kind),
        });
    }
    Ok(certs)
}

/// The first private key among `sections`, borrowed: an owned copy would be
/// freed unwiped, as pki-types' key types do not zeroize on drop.
fn private_key<'a>(sections: &'a [Section], path: &Path) -> Result<PrivateKeyDer<'a>, FileError> {
    let key = sections.iter().find_map(|s| {
        let der = &s.der[..];
        Some(match s.kind {
            SectionKind::PrivateKey => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
            SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
            SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
            _ => return None,
        })
    });
    key.ok_or_else(|| FileError::WrongKind {
        role: Role::Key,
        path: path.to_path_buf(),
        found: found(sections[0].kind),
    })
}

/// When every certificate of a CA bundle is plainly an end entity's
/// (basicConstraints CA:false, or none but an extended key usage, as
/// client and server certificates have), the first one's subject. A
/// certificate without either could be an old v1 root: given the benefit
/// of the doubt.
fn no_ca_among(roots: &[CertificateDer<'static>]) -> Option<String> {
    let mut first = None;
    for der in roots {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return None;
        };
        let end_entity = match cert.basic_constraints() {
            Ok(Some(bc)) => !bc.value.ca,
            Ok(None) => matches!(cert.extended_key_usage(), Ok(Some(_))),
            Err(_) => false,
        };
        if !end_entity {
            return None;
        }
        first.get_or_insert_with(|| cert.subject().to_string());
    }
    first
}

/// Whether the client certificate chains to one of `roots`, as a server
/// trusting those roots would check it. Only "not signed by these CAs"
/// counts as no: anything else a handshake would find on its own.
fn chains_to(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> bool {
    let mut store = rustls::RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
    else {
        return true;
    };
    let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    match verifier.verify_client_cert(&chain[0], &chain[1..], now) {
        Ok(_) => true,
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    struct Pki {
        ca_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate from `pki` with `usage`, valid from `from` to `to`
    /// days relative to now; returns (cert PEM, key PEM).
    fn leaf(pki: &Pki, usage: ExtendedKeyUsagePurpose, from: i64, to: i64) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["app".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app");
        params.extended_key_usages = vec![usage];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(from);
        params.not_after = now + time::Duration::days(to);
        let cert = params.signed_by(&key, &pki.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn check(ca: &str, cert: &str, key: &str) -> Result<Vec<FileWarning>, FileError> {
        check_client_files(
            &ClientFiles {
                ca: FileContents {
                    path: Path::new("ca.pem"),
                    pem: ca.as_bytes(),
                },
                cert: FileContents {
                    path: Path::new("app.pem"),
                    pem: cert.as_bytes(),
                },
                key: FileContents {
                    path: Path::new("app.key"),
                    pem: key.as_bytes(),
                },
            },
            SystemTime::now(),
        )
    }

    /// A client certificate far from its end (no expiry warning).
    fn client(pki: &Pki) -> (String, String) {
        leaf(pki, ExtendedKeyUsagePurpose::ClientAuth, -1, 90)
    }

    #[test]
    fn a_good_set_passes_without_warnings() {
        let pki = ca();
        let (cert, key) = client(&pki);
        assert_eq!(check(&pki.ca_pem, &cert, &key).unwrap(), vec![]);
    }

    #[test]
    fn files_of_the_wrong_kind_are_named() {
        let pki = ca();
        let (cert, key) = client(&pki);
        let err = check(&key, &cert, &key).unwrap_err();
        assert!(
            matches!(
                err,
                FileError::WrongKind {
                    role: Role::Ca,
                    found: Found::PrivateKey,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.explain().contains("ca.pem"), "{}", err.explain());

        let err = check(&pki.ca_pem, &key, &cert).unwrap_err();
        assert!(
            matches!(
                err,
                FileError::WrongKind {
                    role: Role::Cert,
                    found: Found::PrivateKey,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.hint().contains("swapped"), "{}", err.hint());

        let csr = rcgen::CertificateParams::new(vec!["app".to_owned()])
            .unwrap()
            .serialize_request(&KeyPair::generate().unwrap())
            .unwrap()
            .pem()
            .unwrap();
        let err = check(&pki.ca_pem, &csr, &key).unwrap_err();
        assert!(
            matches!(
                err,
                FileError::WrongKind {
                    found: Found::CertificateRequest,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.hint().contains("--csr"), "{}", err.hint());

        // A client's certificate as --ca, the CA's as --cert.
        let err = check(&cert, &cert, &key).unwrap_err();
        assert!(matches!(err, FileError::NotACa { .. }), "{err}");
        assert!(err.to_string().contains("CN=app"), "{err}");
        let (ca_cert, ca_key) = (pki.ca_pem.clone(), pki.issuer.key().serialize_pem());
        let err = check(&pki.ca_pem, &ca_cert, &ca_key).unwrap_err();
        assert!(matches!(err, FileError::CaAsClient { .. }), "{err}");

        let err = check(&pki.ca_pem, &cert, "  \n").unwrap_err();
        assert!(
            matches!(
                err,
                FileError::Empty {
                    role: Role::Key,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("app.key"), "{err}");
        let err = check("hello", &cert, &key).unwrap_err();
        assert!(
            matches!(err, FileError::NotPem { role: Role::Ca, .. }),
            "{err}"
        );
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = check(&pki.ca_pem, &cert, encrypted).unwrap_err();
        assert!(matches!(err, FileError::EncryptedKey { .. }), "{err}");
    }

    #[test]
    fn a_key_of_another_pair_is_a_mismatch() {
        let pki = ca();
        let (cert, _) = client(&pki);
        let (_, other_key) = client(&pki);
        let err = check(&pki.ca_pem, &cert, &other_key).unwrap_err();
        assert!(matches!(err, FileError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("app.key"), "{err}");
    }

    #[test]
    fn validity_and_usage_are_checked() {
        let pki = ca();
        let (cert, key) = leaf(&pki, ExtendedKeyUsagePurpose::ClientAuth, -30, -1);
        let err = check(&pki.ca_pem, &cert, &key).unwrap_err();
        assert!(matches!(err, FileError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired at 20"), "{err}");
        let (cert, key) = leaf(&pki, ExtendedKeyUsagePurpose::ClientAuth, 2, 30);
        let err = check(&pki.ca_pem, &cert, &key).unwrap_err();
        assert!(matches!(err, FileError::NotYetValid { .. }), "{err}");
        let (cert, key) = leaf(&pki, ExtendedKeyUsagePurpose::ServerAuth, -1, 30);
        let err = check(&pki.ca_pem, &cert, &key).unwrap_err();
        assert!(matches!(err, FileError::NoClientAuth { .. }), "{err}");
        assert!(err.hint().contains("server.pem"), "{}", err.hint());
    }

    #[test]
    fn a_certificate_near_its_end_is_a_warning() {
        let pki = ca();
        let (cert, key) = leaf(&pki, ExtendedKeyUsagePurpose::ClientAuth, -1, 10);
        let warnings = check(&pki.ca_pem, &cert, &key).unwrap();
        assert!(
            matches!(warnings.as_slice(), [FileWarning::Expiring { notice, .. }] if notice.days_left == 9),
            "{warnings:?}"
        );
        let text = warnings[0].to_string();
        assert!(
            text.contains("app.pem expires within 30 days") && text.contains("client renew"),
            "{text}"
        );
    }

    #[test]
    fn another_ca_is_a_hint_not_a_refusal() {
        let (ours, theirs) = (ca(), ca());
        let (cert, key) = client(&theirs);
        let warnings = check(&ours.ca_pem, &cert, &key).unwrap();
        assert!(
            matches!(warnings.as_slice(), [FileWarning::NotIssuedByCa { .. }]),
            "{warnings:?}"
        );
        assert!(warnings[0].to_string().contains("--client-ca"));
        // A bundle holding both CAs is fine.
        let bundle = format!("{}{}", theirs.ca_pem, ours.ca_pem);
        assert_eq!(check(&bundle, &cert, &key).unwrap(), vec![]);
    }

    #[test]
    fn the_key_is_read_in_place_not_copied_out_of_its_wiped_section() {
        let key_pem = KeyPair::generate().unwrap().serialize_pem();
        let file = FileContents {
            path: Path::new("app.key"),
            pem: key_pem.as_bytes(),
        };
        let found = sections(file, Role::Key).unwrap();
        let key = private_key(&found, file.path).unwrap();
        // A copy would be freed unwiped: pki-types key types do not zeroize on drop.
        assert_eq!(key.secret_der().as_ptr(), found[0].der.as_ptr());
    }

    #[test]
    fn readable_keys_are_warned_about() {
        let dir = std::env::temp_dir().join(format!("secretfs-keyperm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(key_permissions(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = key_permissions(&path).expect("0644 is readable by others");
        let text = warning.to_string();
        assert!(
            text.contains("chmod 600") && text.contains("0644"),
            "{text}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(key_permissions(&path)
            .unwrap()
            .to_string()
            .contains("group"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod prop_tests;
