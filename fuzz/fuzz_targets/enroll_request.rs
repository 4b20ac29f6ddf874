//! [`EnrollRequest::parse`] on arbitrary request lines.
//!
//! Checked on every input: parsing never panics; an accepted request gives back, through
//! `to_line`, exactly the line it was parsed from (up to and including its line feed), which
//! parses again to the same request (text after the last known field included, kept as
//! `rest`); its name passes `valid_name`; field values respect their
//! limits; a refusal has a manager text starting with `ERROR: `; and `Debug` never shows the
//! password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wazuh_proxy_core::enroll::request::{
    valid_name, MAX_GROUPS, MAX_IP, MAX_KEY_HASH, MAX_REQUEST, MAX_VERSION,
};
use wazuh_proxy_core::enroll::EnrollRequest;

fuzz_target!(|data: &[u8]| {
    match EnrollRequest::parse(data) {
        Ok(req) => {
            let line = req.to_line();
            let lf = data.iter().position(|&b| b == b'\n');
            match lf {
                Some(i) => assert_eq!(&line[..], &data[..=i]),
                None => {
                    assert_eq!(&line[..line.len() - 1], data);
                    assert_eq!(line.last(), Some(&b'\n'));
                }
            }
            assert!(line.len() <= MAX_REQUEST);
            let again = EnrollRequest::parse(&line).expect("to_line parses again");
            assert_eq!(again, req);
            assert!(valid_name(req.name()));
            assert!(req.version().map_or(0, str::len) <= MAX_VERSION);
            assert!(req.groups().map_or(0, str::len) < MAX_GROUPS);
            assert!(req.ip().map_or(0, str::len) <= MAX_IP);
            assert!(req.key_hash().map_or(0, str::len) <= MAX_KEY_HASH);
            if let Some(p) = req.password() {
                assert!(!p.is_empty());
            }
            // Debug shows every field but the password, which is redacted.
            let expected = format!(
                "EnrollRequest {{ password: {}, name: {:?}, version: {:?}, groups: {:?}, ip: {:?}, key_hash: {:?}, rest: {:?} }}",
                if req.has_password() { "Some(\"<redacted>\")" } else { "None" },
                req.name(),
                req.version(),
                req.groups(),
                req.ip(),
                req.key_hash(),
                req.rest()
            );
            assert_eq!(format!("{req:?}"), expected);
        }
        Err(e) => {
            let text = e.manager_text();
            assert!(text.starts_with("ERROR: "), "{text:?}");
            let _ = e.to_string();
        }
    }
});
