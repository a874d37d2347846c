//! What the mount knows about its own client certificate: serial and
//! validity (for the status file, the expiry warning and the renewal
//! schedule), read as the server and the CLI read it
//! ([`secretfs_proto::cert`]). Whether a key belongs to it is
//! [`secretfs_proto::credentials::key_matches`] (every key format).

pub use secretfs_proto::cert::{rfc3339, CertInfo};

#[cfg(test)]
pub(crate) mod tests {
    use std::time::SystemTime;

    use super::*;

    /// A self-signed certificate valid `days` from now, and its key.
    pub fn cert_and_key(days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "web-1");
        params.distinguished_name = dn;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x4a, 0x01, 0xff]));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn two_thirds_of_a_thirty_day_life() {
        let (cert, _) = cert_and_key(29);
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        let left = info.remaining(SystemTime::now()).as_secs() / 86_400;
        assert_eq!(left, 28, "29 days minus the seconds since");
        let two_thirds = info.point_in_life(2.0 / 3.0);
        assert_eq!(
            two_thirds
                .duration_since(info.not_before)
                .unwrap()
                .as_secs(),
            20 * 86_400
        );
    }
}
