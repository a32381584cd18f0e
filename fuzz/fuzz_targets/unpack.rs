//! The unpacker must never panic or write outside its destination, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Structure-only verification exercises the whole payload path without signatures.
    let limits = convoy_bundle::Limits { max_unpacked_bytes: 16 << 20, ..Default::default() };
    let _ = convoy_bundle::verify_reader(data, None, &limits);
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(_) => return,
    };
    let bundle = tmp.path().join("b");
    if std::fs::write(&bundle, data).is_ok() {
        let key = convoy_bundle::SecretKey::generate();
        let trust = convoy_bundle::TrustStore::new(vec![key.public()], 1);
        let dest = tmp.path().join("out");
        if convoy_bundle::unpack(&bundle, &trust, &dest, &limits).is_err() {
            assert!(!dest.exists());
        }
    }
});
